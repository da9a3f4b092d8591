"""Prometheus metrics shared by every stage, engine and ops process (one registry per process).

Stages call `record_output` with every event they send, so training, export, evaluation and
promotion figures come from the same events the pipeline acts on and cannot drift from them.
Serving's own metrics (hot set, residency, cold loads) are defined with serving
(`workers/serving/metrics.py`); every metric lands in the process's one registry.
Lag comes from the broker (committed vs. log-end offsets), sampled by `LagExporter`, because a
consumer cannot see its own lag reliably while it is stuck.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from pydantic import BaseModel

from infra.admin import LagRow, consumer_lag
from infra.settings import Settings
from schemas.events import (
    AdapterEvaluated,
    AdapterExported,
    PolicyPromoted,
    PolicyRolledBack,
    PolicyUpdated,
    RolloutRewarded,
)

log = logging.getLogger(__name__)

EVENTS = Counter(
    "lorastream_events_total",
    "Events handled per stage, by outcome (ok, duplicate, dead_letter).",
    ["stage", "outcome"],
)
LATENCY = Histogram(
    "lorastream_stage_seconds",
    "Time from decoding an event to having sent its outputs.",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REBALANCES = Counter("lorastream_rebalances_total", "Partition assignments this worker took "
                     "part in.")
REBALANCE_SECONDS = Gauge("lorastream_rebalance_seconds", "Revocation to assignment of the "
                          "last rebalance (processing is paused in between).")
OUTPUTS = Counter("lorastream_outputs_total", "Events sent downstream, by kind.", ["kind"])
ROLLOUT_REWARD = Gauge("lorastream_rollout_reward", "Mean reward of the policy's last rollout "
                       "group.", ["policy"])
GRPO_LOSS = Gauge("lorastream_grpo_loss", "GRPO loss of the policy's last step.", ["policy"])
GRPO_REWARD = Gauge("lorastream_grpo_reward", "Mean reward of the policy's last GRPO step.",
                    ["policy"])
GRPO_KL = Gauge("lorastream_grpo_kl", "KL to the base of the policy's last GRPO step.", ["policy"])
GRPO_STEP = Gauge("lorastream_grpo_step", "The policy's last trainer step.", ["policy"])
EXPORT_BYTES = Histogram(
    "lorastream_export_bytes",
    "Size of adapter-only revisions written to the artifact store.",
    buckets=(1e4, 1e5, 1e6, 4e6, 1.6e7, 6.4e7, 2.56e8, 1e9),
)
EVAL_SCORE = Gauge("lorastream_eval_score", "Held-out score of the policy's last evaluated "
                   "revision.", ["policy"])
EVAL_BASELINE = Gauge("lorastream_eval_baseline_score", "Held-out score of what served when the "
                      "last revision was evaluated.", ["policy"])
EVALUATIONS = Counter("lorastream_evaluations_total", "Revisions evaluated, by verdict.",
                      ["policy", "passed"])
SERVING_REVISION = Gauge("lorastream_serving_revision", "The policy's serving revision "
                         "(0 = base).", ["policy"])
CONSUMER_LAG = Gauge("lorastream_consumer_lag", "Records a consumer group has yet to commit.",
                     ["group", "topic", "partition"])
SDK_SKIPPED = Counter("lorastream_sdk_skipped_total", "Undecodable events SDK consumers skipped.",
                      ["topic"])


def record_output(event: BaseModel) -> None:
    """Update the metrics an output event carries; unknown kinds only count as outputs."""
    OUTPUTS.labels(kind=str(getattr(event, "kind", type(event).__name__))).inc()
    if isinstance(event, RolloutRewarded) and event.rewards:
        ROLLOUT_REWARD.labels(event.policy_id).set(sum(event.rewards) / len(event.rewards))
    elif isinstance(event, PolicyUpdated):
        GRPO_LOSS.labels(event.policy_id).set(event.loss)
        GRPO_REWARD.labels(event.policy_id).set(event.mean_reward)
        GRPO_KL.labels(event.policy_id).set(event.kl)
        GRPO_STEP.labels(event.policy_id).set(event.step)
    elif isinstance(event, AdapterExported):
        EXPORT_BYTES.observe(event.size_bytes)
    elif isinstance(event, AdapterEvaluated):
        EVAL_SCORE.labels(event.policy_id).set(event.score)
        EVAL_BASELINE.labels(event.policy_id).set(event.baseline_score)
        EVALUATIONS.labels(event.policy_id, str(event.passed).lower()).inc()
    elif isinstance(event, PolicyPromoted):
        SERVING_REVISION.labels(event.policy_id).set(event.revision)
    elif isinstance(event, PolicyRolledBack):
        SERVING_REVISION.labels(event.policy_id).set(event.to_revision)


def set_consumer_lag(rows: Iterable[LagRow]) -> None:
    """Replace the lag gauges with a fresh sample (partitions no longer seen disappear)."""
    CONSUMER_LAG.clear()
    for r in rows:
        CONSUMER_LAG.labels(r.group, r.topic, str(r.partition)).set(r.lag)


class LagExporter:
    """Samples consumer lag from the broker every `interval_s` into the lag gauges (a thread)."""

    def __init__(self, settings: Settings, group: str | None = None,
                 interval_s: float = 15.0) -> None:
        self.settings, self.group, self.interval_s = settings, group, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorastream-lag", daemon=True)

    def start(self) -> LagExporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                set_consumer_lag(consumer_lag(self.settings, group=self.group))
            except Exception as exc:  # a broker hiccup must not kill the exporter
                log.warning("sampling consumer lag failed: %s", exc)
            self._stop.wait(self.interval_s)


def serve(port: int, settings: Settings, group: str | None = None,
          lag_interval_s: float = 15.0) -> LagExporter:
    """Expose /metrics on `port` (all interfaces) and keep the lag gauges fresh."""
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)
    return LagExporter(settings, group=group, interval_s=lag_interval_s).start()
