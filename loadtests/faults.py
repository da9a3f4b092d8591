"""Faults under load: kill and restart a worker, the broker and Redis on a schedule, then audit.

`python -m loadtests.faults --events 100000 --json`

On a private stack (`loadtests/fault_stack.py`: its own KRaft broker and AOF Redis, so the
shared development services are never touched) one `lorastream worker --stages reward`
consumes N rollout groups, each carrying its interaction log, while a producer pushes them in
chunks (a chunk whose delivery failed, e.g. while the broker is down, is sent again: the retry
duplicates a producer makes). The reward stage is the one stage that needs no model, so N can be
10^5 on a CPU; its dedup, derived ids, dead letters and commits are the code every stage runs.
Schedule, by share of events produced: 20% SIGKILL the worker (restart it), 40% restart the
broker, 60% SIGKILL Redis (restart it; AOF with fsync every second), 80% SIGKILL the worker.
`recovery_s` of a fault = injection until new outputs appear again.

Audit, by event id: `lost` = inputs with neither an output (`derive_id("reward", input)`) nor a
dead letter; `duplicated` = outputs beyond one per input that a consumer deduplicating by event
id would still see as new effects (an output id no input derives, or a second distinct id for
one input); `redelivered_copies` = raw records repeating an id (at-least-once re-sends, which
every stage drops by id); `mismatched` = outputs whose content differs from what a run without
faults produces (the reward stage is a pure function of its input, so that reference is computed
in-process). Progress on stderr; last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from infra import admin
from infra.security import kafka_python_config
from infra.settings import Settings
from loadtests.fault_stack import FaultStack
from schemas.codec import encode_event
from schemas.events import Completion, InteractionLogged, RolloutGenerated
from schemas.ids import derive_id
from streams.app import group_id
from workers.rewards.functions import score_completions

CHUNK = 2000
SCHEDULE = ((0.2, "worker"), (0.4, "broker"), (0.6, "redis"), (0.8, "worker"))


def log(msg: str) -> None:
    print(f"[faults-bench] {msg}", file=sys.stderr, flush=True)


def make_events(n: int) -> list[tuple[str, bytes, bytes]]:
    """(event id, key, value) of N rollout groups over 64 policies."""
    out = []
    completions = [Completion(text=t, token_ids=[5] * len(t), logprobs=[-1.0] * len(t))
                   for t in ("", "abc", "abcdefgh")]
    for i in range(n):
        policy = f"user-{i % 64}"
        inter = InteractionLogged(policy_id=policy, prompt=f"q{i}?", task="length",
                                  task_params={"target_chars": i % 11})
        ro = RolloutGenerated(policy_id=policy, interaction=inter, revision=0, prompt_ids=[1],
                              completions=completions, temperature=1.0)
        out.append((ro.event_id, policy.encode(), encode_event(ro)))
    return out


def _end_total(settings: Settings, topic: str) -> int:
    consumer = KafkaConsumer(**kafka_python_config(settings), request_timeout_ms=5000)
    try:
        name = settings.topic(topic)
        parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


def _retrying(fn: Callable[[], Any], until_s: float = 300.0) -> Any:
    deadline = time.monotonic() + until_s
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Producer:
    """Sends events in order; a chunk with a failed delivery is sent again (same ids)."""

    def __init__(self, settings: Settings, events: list[tuple[str, bytes, bytes]],
                 topic: str = "rollouts") -> None:
        self.settings, self.events, self.topic = settings, events, topic
        self.sent = 0
        self.resent_chunks = 0
        self._producer = KafkaProducer(**kafka_python_config(settings), acks="all",
                                       linger_ms=20, batch_size=256 * 1024, retries=5,
                                       request_timeout_ms=10000, max_block_ms=30000)

    def send_until(self, upto: int, deadline_s: float = 300.0) -> None:
        topic = self.settings.topic(self.topic)
        deadline = time.monotonic() + deadline_s
        while self.sent < upto:
            chunk = self.events[self.sent:min(self.sent + CHUNK, upto)]
            try:
                futures = [self._producer.send(topic, key=k, value=v) for _, k, v in chunk]
                for f in futures:
                    f.get(timeout=60)
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                self.resent_chunks += 1
                log(f"chunk at {self.sent} failed ({type(exc).__name__}); sending it again")
                time.sleep(1.0)
                continue
            self.sent += len(chunk)

    def close(self) -> None:
        self._producer.close(30)


def read_ids(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every record of a topic, decoded (no consumer group)."""
    consumer = KafkaConsumer(**kafka_python_config(settings), enable_auto_commit=False)
    name = settings.topic(topic)
    parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    out: list[dict[str, Any]] = []
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for records in consumer.poll(timeout_ms=500, max_records=5000).values():
            out += [orjson.loads(r.value) for r in records]
    consumer.close()
    return out


def fault_free(events: list[tuple[str, bytes, bytes]]) -> dict[str, list[float]]:
    """What a run without faults produces: each output id with its rewards (the stage is a
    pure function of its input, so this is computed here, not by a second run)."""
    out = {}
    for event_id, _, raw in events:
        ro = RolloutGenerated.model_validate_json(raw)
        rewards, _, _ = score_completions(ro.interaction, [c.text for c in ro.completions])
        out[derive_id("reward", event_id)] = rewards
    return out


def audit(settings: Settings, expected: dict[str, list[float]]) -> dict[str, int]:
    outputs = read_ids(settings, "rewards")
    letters = read_ids(settings, "dead-letters")
    counts = Counter(o["event_id"] for o in outputs)
    lettered = len(letters)
    lost = sum(1 for out_id in expected if out_id not in counts) - lettered
    unexpected = sum(1 for out_id in counts if out_id not in expected)
    mismatched = len({o["event_id"] for o in outputs
                      if o["event_id"] in expected and o["rewards"] != expected[o["event_id"]]})
    return {"lost": max(lost, 0), "duplicated": unexpected, "dead_lettered": lettered,
            "mismatched": mismatched, "redelivered_copies": sum(counts.values()) - len(counts)}


def inject(stack: FaultStack, kind: str) -> None:
    if kind == "worker":
        stack.kill_worker("reward")
        stack.start_worker("reward")
    elif kind == "broker":
        stack.stop_kafka()
        stack.start_kafka()
    else:
        stack.kill_redis()
        stack.start_redis()


def _supervise(stack: FaultStack) -> None:
    """Restart a worker that exited by itself, as systemd or Kubernetes would."""
    if stack.workers["reward"].poll() is not None:
        log(f"worker exited ({stack.workers['reward'].returncode}); restarting it")
        stack.start_worker("reward")


def _wait_outputs(stack: FaultStack, above: int, timeout_s: float) -> None:
    """Until the output topic holds more than `above` records."""
    t0 = time.monotonic()
    while _retrying(lambda: _end_total(stack.settings, "rewards")) <= above:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no new outputs within {timeout_s} s")
        _supervise(stack)
        time.sleep(0.2)


def _drained(settings: Settings) -> bool:
    """The worker's group committed every input (offsets move only after handling)."""
    rows = [r for r in admin.consumer_lag(settings, group_id(settings, ["reward"]))
            if r.topic == settings.topic("rollouts")]
    return bool(rows) and all(r.lag == 0 for r in rows)


def run(n: int, root: Path, schedule: tuple[tuple[float, str], ...] = SCHEDULE,
        timeout_s: float = 1800.0) -> dict[str, Any]:
    """Produce up to each fault's share, inject it, and time how long until outputs flow again
    (the next chunk, never past the next fault's share, is produced right after the injection,
    so there is always new work to answer, however fast the worker kept up before)."""
    stack = FaultStack(root).start()
    try:
        s = stack.settings
        events = make_events(n)
        log(f"{n} events built; private broker {s.bootstrap_servers}, redis {s.redis_url}")
        stack.start_worker("reward")
        producer = Producer(s, events)
        started = time.monotonic()
        recoveries = []
        marks = [int(share * n) for share, _ in schedule[1:]] + [n]
        for (share, kind), next_mark in zip(schedule, marks, strict=True):
            producer.send_until(int(share * n))
            base = _retrying(lambda: _end_total(s, "rewards"))
            t0 = time.monotonic()
            log(f"{producer.sent} sent, {base} out: injecting {kind} fault")
            inject(stack, kind)
            producer.send_until(min(next_mark, producer.sent + CHUNK))
            _wait_outputs(stack, base, 300.0)
            recoveries.append(time.monotonic() - t0)
            log(f"{kind}: outputs flowing again after {recoveries[-1]:.1f} s")
        producer.send_until(n)
        producer.close()
        while not _retrying(lambda: _drained(s)):
            if time.monotonic() - started > timeout_s:
                raise TimeoutError("the worker did not finish")
            _supervise(stack)
            time.sleep(1.0)
        seconds = time.monotonic() - started
        result = audit(s, fault_free(events))
        return {"events": n, "faults_injected": len(schedule), **result,
                "recovery_s_max": round(max(recoveries), 2),
                "resent_chunks": producer.resent_chunks, "seconds": round(seconds, 1)}
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorastream-faults-") as tmp:
        result = run(args.events, Path(tmp))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
