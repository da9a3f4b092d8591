"""The local infrastructure against the real broker and Redis: `infra up`, topics, lag."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from infra import admin, services
from infra.settings import REPO_ROOT, Settings
from infra.topics import PIPELINE_TOPICS, topic_names
from streams.cli import infra as cli
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def _lorastream(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, pointed at this test's namespace."""
    env = {
        **os.environ,
        "LORASTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "LORASTREAM_REDIS_URL": settings.redis_url,
        "LORASTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "LORASTREAM_APP_ID": settings.app_id,
        "LORASTREAM_REDIS_PREFIX": settings.redis_prefix,
        "LORASTREAM_PARTITIONS": str(settings.partitions),
    }
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_infra_up_is_idempotent_and_status_reports_both(settings: Settings) -> None:
    first = _lorastream(settings, "infra", "up")
    assert first.returncode == 0, first.stderr
    t0 = time.monotonic()
    second = _lorastream(settings, "infra", "up")
    warm_s = time.monotonic() - t0
    assert second.returncode == 0, second.stderr
    assert "topics 0 created" in second.stdout
    for name in ("redis", "kafka"):
        line = next(ln for ln in second.stdout.splitlines() if ln.startswith(name))
        assert "running" in line or "external" in line, second.stdout
    assert warm_s < 30, f"a second `infra up` should only check, took {warm_s:.1f} s"

    status = _lorastream(settings, "infra", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["kafka"]["answering"] and report["redis"]["answering"]
    assert report["topics"] == len(PIPELINE_TOPICS)


def test_topics_have_partitions_and_configs(settings: Settings) -> None:
    assert admin.create_topics(settings) == [], "creating existing topics is a no-op"
    info = admin.describe_topics(settings, topic_names(settings))
    assert sorted(info) == sorted(topic_names(settings))
    assert {t.partitions for t in info.values()} == {2}
    catalog = info[settings.topic("catalog")]
    assert catalog.configs["cleanup.policy"] == "compact"
    interactions = info[settings.topic("interactions")]
    assert interactions.configs["cleanup.policy"] == "delete"
    assert interactions.configs["retention.ms"] == str(7 * 24 * 3600 * 1000)


def test_services_answer_and_redis_is_usable(settings: Settings, redis_client: redis.Redis) -> None:
    assert services.kafka_answers(settings)
    assert services.redis_answers(settings)
    redis_client.set(settings.key("probe"), b"1")
    assert redis_client.get(settings.key("probe")) == b"1"


def _produce(settings: Settings, tp: TopicPartition, n: int) -> None:
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    try:
        for i in range(n):
            producer.send(tp.topic, value=f"m{i}".encode(), partition=tp.partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consume_and_commit(settings: Settings, tp: TopicPartition, group: str, k: int) -> None:
    """Read k records from the start of `tp` and commit offset k, as a group member would."""
    consumer = KafkaConsumer(
        **admin.client_config(settings), group_id=group, enable_auto_commit=False
    )
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        seen: list[int] = []

        def got_k() -> bool:
            for records in consumer.poll(timeout_ms=200, max_records=k - len(seen)).values():
                seen.extend(r.offset for r in records)
            return len(seen) >= k

        wait_for(got_k, timeout=30, message=f"{k} records from {tp}")
        assert seen[:k] == list(range(k))
        consumer.commit({tp: OffsetAndMetadata(seen[k - 1] + 1, "", -1)})
    finally:
        consumer.close()


def _kafka_tool_lag(settings: Settings, group: str, tp: TopicPartition) -> tuple[int, int, int]:
    """(current, log end, lag) for `tp` as Kafka's own kafka-consumer-groups.sh reports it."""
    done = services.run_kafka_tool(
        settings, "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "--bootstrap-server", settings.bootstrap_servers, "--describe", "--group", group,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in done.stdout.splitlines():
        cols = line.split()
        if cols[:3] == [group, tp.topic, str(tp.partition)]:
            return int(cols[3]), int(cols[4]), int(cols[5])
    raise AssertionError(f"no row for {tp} in:\n{done.stdout}")


def test_consumer_lag_matches_committed_and_end_offsets(settings: Settings) -> None:
    n, k = 10, 4
    tp = TopicPartition(settings.topic("interactions"), 1)
    group = f"{settings.app_id}-lagprobe"
    _produce(settings, tp, n)
    _consume_and_commit(settings, tp, group, k)

    rows = admin.consumer_lag(settings, group=group)
    assert [(r.topic, r.partition, r.committed, r.end_offset, r.lag) for r in rows] == [
        (tp.topic, tp.partition, k, n, n - k)
    ]
    everyone = admin.consumer_lag(settings)
    assert rows[0] in everyone
    assert all(r.topic.startswith(settings.topic_prefix) for r in everyone)

    assert _kafka_tool_lag(settings, group, tp) == (k, n, n - k)


def test_lag_command_prints_json(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    tp = TopicPartition(settings.topic("rollouts"), 0)
    group = f"{settings.app_id}-cli"
    _produce(settings, tp, 3)
    _consume_and_commit(settings, tp, group, 1)
    args = argparse.Namespace(group=group, json=True, all_topics=False, verbose=False)
    assert cli.cmd_lag(args, settings) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"group": group, "topic": tp.topic, "partition": 0, "committed": 1, "end_offset": 3,
         "lag": 2, "rate": None, "drain_s": None}  # one sample: no rate (see test_ops_lag)
    ]
