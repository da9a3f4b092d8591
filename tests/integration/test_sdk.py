"""The SDK against the real broker: producer validation and delivery, at-least-once consumer."""

from __future__ import annotations

import asyncio
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from infra import admin
from infra.settings import REPO_ROOT, Settings, settings_env
from schemas.codec import encode_event
from schemas.events import AdapterEvaluated
from streams.sdk.consumer import EvaluationConsumer
from streams.sdk.producer import InteractionProducer, InvalidInteraction, ProduceError
from streams.sdk.watch import tail
from tests.support.processes import free_port, lorastream
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SHA = "c3" * 32


def _read_interactions(settings: Settings, n: int) -> list[tuple[bytes, dict]]:
    """Exactly what reached the interactions topic (key, value), waiting for `n` records."""
    seen: list[dict] = []
    for event in tail(settings, "interactions", from_beginning=True, timeout_s=10):
        seen.append(event)
        if len(seen) >= n:
            break
    return [(e["policy_id"].encode(), e) for e in seen]


def _records_in(settings: Settings, topic: str) -> int:
    consumer = KafkaConsumer(**admin.client_config(settings))
    try:
        name = settings.topic(topic)
        parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or []]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


def test_producer_validates_batches_and_sends_idempotently(settings: Settings) -> None:
    with InteractionProducer(settings, linger_ms=20) as producer:
        assert producer.config["enable_idempotence"] is True
        assert producer.config["acks"] == -1 and producer.config["linger_ms"] == 20
        with pytest.raises(InvalidInteraction) as bad:
            producer.send({"policy_id": "no/slashes", "prompt": "hi"})
        assert bad.value.reason.startswith("policy_id:"), bad.value.reason
        sent = [producer.send({"policy_id": pid, "prompt": f"q{i}", "task": "length"})
                for i, pid in enumerate(("alice", "bob", "alice"))]
        report = producer.send_many(['{"policy_id": "bob", "prompt": "ok"}', "{not json",
                                     '{"policy_id": "bob", "prompt": ""}', ""])
    assert report.sent == 1
    assert [n for n, _ in report.rejected] == [2, 3]
    assert report.rejected[0][1].startswith("malformed JSON")
    assert report.rejected[1][1].startswith("prompt:")

    got = _read_interactions(settings, 4)
    assert sorted(e["event_id"] for _, e in got if e["prompt"] != "ok") == sorted(
        e.event_id for e in sent)
    assert len(got) == _records_in(settings, "interactions") == 4  # nothing invalid or twice
    # Keyed by policy: each policy's events are in order on one partition.
    assert [e["prompt"] for _, e in got if e["policy_id"] == "alice"] == ["q0", "q2"]


def test_producer_error_names_an_unreachable_broker(settings: Settings) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    bad = Settings(**{**settings.model_dump(), "bootstrap_servers": nowhere})
    t0 = time.monotonic()
    with pytest.raises(ProduceError, match=re.escape(nowhere)):
        InteractionProducer(bad, connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 15


def _evaluation(revision: int) -> AdapterEvaluated:
    return AdapterEvaluated(policy_id="carol", revision=revision, sha256=SHA, path=f"/r{revision}",
                            score=0.5 + revision / 10, baseline_revision=revision - 1,
                            baseline_score=0.5, prompts=4, passed=True)


def _write_evaluations(settings: Settings, values: list[bytes]) -> None:
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    for value in values:  # one key: one partition, in this order
        producer.send(settings.topic("evaluations"), key=b"carol", value=value)
    producer.flush(timeout=30)
    producer.close()


def _group_lag(settings: Settings, group: str) -> tuple[int, int]:
    rows = admin.consumer_lag(settings, group=group)
    return sum(r.committed for r in rows), sum(r.lag for r in rows)


class Boom(Exception):
    pass


async def _consume(settings: Settings, group: str) -> list[int]:
    """Three consumers in one group: stop early, fail on an event, then finish."""
    first = EvaluationConsumer(settings, group, from_beginning=True, idle_timeout_s=10)
    async with first:
        got = [(await anext(first)).revision, (await anext(first)).revision]
    assert first.skipped == 1  # the junk between r1 and r2
    assert _group_lag(settings, group) == (3, 1)  # r1, junk, r2 done: committed at offset 3

    with pytest.raises(Boom):
        async with EvaluationConsumer(settings, group, idle_timeout_s=10) as second:
            async for ev in second:
                got.append(ev.revision)
                raise Boom  # handling r3 failed: it must not be committed
    assert _group_lag(settings, group) == (3, 1)

    async with EvaluationConsumer(settings, group, idle_timeout_s=2) as third:
        got += [ev.revision async for ev in third]  # r3 again, then idle
    return got


def test_evaluation_consumer_is_at_least_once(settings: Settings) -> None:
    values = [encode_event(_evaluation(1)), b"\x00 not an event", encode_event(_evaluation(2)),
              encode_event(_evaluation(3))]
    _write_evaluations(settings, values)
    group = f"{settings.app_id}-sdk-evals"
    assert asyncio.run(_consume(settings, group)) == [1, 2, 3, 3]
    assert _group_lag(settings, group) == (4, 0)


def _readme_sdk_blocks() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## SDK\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_sdk_examples_run(settings: Settings) -> None:
    producer_example, consumer_example = _readme_sdk_blocks()
    env = {**os.environ, **settings_env(settings)}
    done = subprocess.run([sys.executable, "-c", producer_example], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("queued ") == 2 and "rejected: prompt:" in done.stdout
    assert len(_read_interactions(settings, 2)) == 2

    _write_evaluations(settings, [encode_event(_evaluation(1))])
    proc = subprocess.Popen([sys.executable, "-c", consumer_example], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = wait_for(lambda: _line_ready(proc), timeout=30,
                        message="the consumer example to print an evaluation")
        assert line is not None
        assert line.strip() == "carol r1: 0.600 vs r0 0.500, passed"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _line_ready(proc: subprocess.Popen[str]) -> str | None:
    """A line of the child's output if one is ready (never blocks); fails if it exited."""
    assert proc.stdout is not None
    if select.select([proc.stdout], [], [], 0)[0]:
        return proc.stdout.readline() or None
    assert proc.poll() is None, f"the example exited with {proc.returncode}"
    return None


def test_produce_command_rejects_bad_lines(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    path.write_bytes(orjson.dumps({"policy_id": "dave", "prompt": "hi"}) + b"\n{oops\n")
    done = lorastream(settings, "produce", str(path))
    assert done.returncode == 1
    assert "line 2: rejected: malformed JSON" in done.stderr and "sent 1" in done.stderr
