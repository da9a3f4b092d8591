"""`lorastream infra up --brokers 3`: a three-node KRaft cluster from the same jars, every topic
replicated three times with `min.insync.replicas` 2, so producers with `acks=all` go on writing,
and lose nothing, while one node is down."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from infra import admin, cluster
from infra.settings import REPO_ROOT, Settings, settings_env


@pytest.fixture
def three(infra_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    s = infra_settings.model_copy(update={
        "bootstrap_servers": f"127.0.0.1:{cluster.free_block()}", "data_dir": tmp_path / "data",
        "topic_prefix": "c3.", "app_id": "c3", "partitions": 3})
    shared = infra_settings.data_dir / "kafka" / "libs"
    libs = s.data_dir / "kafka" / "libs"
    if shared.is_dir():  # the jars `infra up` resolved: no second Maven run
        libs.parent.mkdir(parents=True)
        libs.symlink_to(shared, target_is_directory=True)
    yield s
    cluster.stop_cluster(s, 3)


def _cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args],
                          env={**os.environ, **settings_env(s)}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=400)


def test_three_brokers_keep_acked_writes_through_a_node_loss(three: Settings) -> None:
    up = _cli(three, "infra", "up", "--brokers", "3", "--timeout", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    s = three.model_copy(update={"bootstrap_servers": cluster.bootstrap(three, 3)})
    assert f"LORASTREAM_BOOTSTRAP_SERVERS={s.bootstrap_servers}" in up.stdout
    assert cluster.brokers_answering(s) == 3
    topic = s.topic("rewards")
    info = admin.describe_topics(s, [topic])[topic]
    assert info.partitions == 3 and info.configs.get("min.insync.replicas", "2") == "2"
    with admin.admin_client(s) as client:
        (meta,) = client.describe_topics([topic])
    assert all(len(p["replica_nodes"]) == 3 for p in meta["partitions"])

    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", retries=10,
                             request_timeout_ms=15000)
    sent = [producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(50)]
    producer.flush(60)
    cluster.stop_node(cluster.nodes(three, 3)[0], kill=True)  # a node dies
    sent += [producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
             for i in range(50, 100)]
    producer.flush(120)
    assert all(f.get(60) for f in sent)  # every write acknowledged by two in-sync replicas
    producer.close(10)

    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in range(3)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    values: set[bytes] = set()
    while len(values) < 100:
        polled = consumer.poll(timeout_ms=5000)
        assert polled, f"only {len(values)} of 100 records readable with a node down"
        values |= {r.value for recs in polled.values() for r in recs}
    consumer.close()
    assert values == {f"v{i}".encode() for i in range(100)}
    down = _cli(three, "infra", "down")
    assert down.returncode == 0 and "node 2" in down.stdout and "node 3" in down.stdout
    assert cluster.running_nodes(three) == []
