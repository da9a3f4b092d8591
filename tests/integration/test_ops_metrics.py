"""Prometheus metrics: what each output event records, and a real worker's /metrics endpoint."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from infra import admin
from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import (
    AdapterEvaluated,
    AdapterExported,
    Completion,
    InteractionLogged,
    PolicyPromoted,
    PolicyUpdated,
    RolloutGenerated,
)
from streams.ops import metrics
from tests.support.processes import free_port, start_worker, stop_process
from tests.support.waiting import wait_for
from workers.serving import metrics as serving_metrics

pytestmark = pytest.mark.integration

SHA = "ab" * 32


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_record_output_updates_the_metric_of_each_kind() -> None:
    pid = f"m{uuid.uuid4().hex[:8]}"
    metrics.record_output(PolicyUpdated(policy_id=pid, step=3, loss=0.25, mean_reward=0.5,
                                        kl=0.01, tokens=10))
    before = _value("lorastream_export_bytes_count") or 0.0
    metrics.record_output(AdapterExported(policy_id=pid, revision=1, step=4, parent_revision=0,
                                          sha256=SHA, path="p", size_bytes=123_456, rank=4,
                                          alpha=8.0, base_model="tiny"))
    metrics.record_output(AdapterEvaluated(policy_id=pid, revision=1, sha256=SHA, path="p",
                                           score=0.8, baseline_revision=0, baseline_score=0.6,
                                           prompts=4, passed=True))
    metrics.record_output(PolicyPromoted(policy_id=pid, revision=1, previous_revision=0,
                                         score=0.8, sha256=SHA, path="p", serve_name=f"{pid}@1"))
    assert _value("lorastream_grpo_loss", policy=pid) == 0.25
    assert _value("lorastream_grpo_reward", policy=pid) == 0.5
    assert _value("lorastream_grpo_kl", policy=pid) == 0.01
    assert _value("lorastream_export_bytes_count") == before + 1
    assert _value("lorastream_eval_score", policy=pid) == 0.8
    assert _value("lorastream_evaluations_total", policy=pid, passed="true") == 1
    assert _value("lorastream_serving_revision", policy=pid) == 1

    engine = f"e{pid}"
    serving_metrics.set_hot_set(engine, 3)
    serving_metrics.set_residency(engine, "gpu", 2)
    serving_metrics.note_cold_load(engine)
    assert _value("lorastream_hot_set_size", engine=engine) == 3
    assert _value("lorastream_adapters", engine=engine, state="gpu") == 2
    assert _value("lorastream_cold_loads_total", engine=engine) == 1


def _rollout(policy_id: str) -> RolloutGenerated:
    interaction = InteractionLogged(policy_id=policy_id, prompt="hi?", task="length",
                                    task_params={"target_chars": 2})
    done = Completion(text="ok", token_ids=[1, 2], logprobs=[-0.1, -0.2])
    return RolloutGenerated(policy_id=policy_id, interaction=interaction, revision=0,
                            prompt_ids=[5], completions=[done, done], temperature=1.0)


@pytest.fixture
def reward_worker(settings: Settings, tmp_path: Path) -> Iterator[int]:
    """`lorastream worker --stages reward --metrics-port P` as a real process; yields P."""
    port, log = free_port(), tmp_path / "worker.log"
    proc = start_worker(settings, "reward", log, "--metrics-port", str(port),
                        "--lag-interval", "0.5")
    try:
        yield port
    finally:
        stop_process(proc, log)


def test_worker_serves_stage_metrics_and_lag(settings: Settings, reward_worker: int) -> None:
    pid = "metricspolicy"
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    producer.send(settings.topic("rollouts"), key=pid.encode(), value=encode_event(_rollout(pid)))
    producer.send(settings.topic("rollouts"), key=pid.encode(), value=b"not json")
    producer.flush(timeout=30)
    producer.close()

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{reward_worker}/metrics",
                                        timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            return ""

    wanted = (
        'lorastream_events_total{outcome="ok",stage="reward"} 1.0',
        'lorastream_events_total{outcome="dead_letter",stage="reward"} 1.0',
        'lorastream_outputs_total{kind="rollout_rewarded"} 1.0',
        f'lorastream_rollout_reward{{policy="{pid}"}} 1.0',
        'lorastream_stage_seconds_count{stage="reward"} 1.0',
        f'lorastream_consumer_lag{{group="{settings.app_id}.reward",partition=',
    )
    def complete() -> str | None:
        text = scrape()
        return text if all(w in text for w in wanted) else None

    text = wait_for(complete, timeout=60, interval=0.3,
                    message="the worker's /metrics to show the processed events")
    assert text is not None
    lag_lines = [ln for ln in text.splitlines() if ln.startswith("lorastream_consumer_lag{")]
    assert all(settings.topic("rollouts") in ln for ln in lag_lines), lag_lines
