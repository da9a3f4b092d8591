"""Helpers for the ops and SDK tests: write records, commit offsets, run the real CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from infra import admin
from infra.settings import REPO_ROOT, Settings, settings_env


def produce(settings: Settings, tp: TopicPartition, values: list[bytes]) -> None:
    """Write `values` to one partition and wait until the broker has them all."""
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    try:
        for value in values:
            producer.send(tp.topic, value=value, partition=tp.partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def commit(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit offsets for `group` the way a group member would (no records need reading)."""
    consumer = KafkaConsumer(**admin.client_config(settings), group_id=group,
                             enable_auto_commit=False)
    try:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
    finally:
        consumer.close()


def lorastream(settings: Settings, *args: str, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, pointed at this test's namespace."""
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
