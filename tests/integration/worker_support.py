"""Worker subprocesses and topic reads for reliability tests (real broker, real Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from infra.process import stop_child
from infra.security import kafka_python_config
from infra.settings import REPO_ROOT, Settings, settings_env
from streams.sdk.watch import tail


def start_worker(settings: Settings, stages: str, log: Path) -> subprocess.Popen[bytes]:
    """`lorastream worker --stages STAGES` with exactly these settings; output goes to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--stages", stages],
            env={**os.environ, **settings_env(settings)}, cwd=REPO_ROOT, stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_worker(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM (Faust commits on the way out), then SIGKILL if it hangs; print a failed log."""
    if stop_child(proc) not in (0, -15, 137) and log.exists():
        print(log.read_text(errors="replace")[-4000:])


def read_topic(settings: Settings, topic: str, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """Every event on a logical topic so far (no consumer group)."""
    return list(tail(settings, topic, from_beginning=True, timeout_s=timeout_s))


def produce_raw(settings: Settings, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    """Send raw (key, value) pairs exactly as given: no validation, no encoding."""
    producer = KafkaProducer(**kafka_python_config(settings), acks="all")
    try:
        for key, value in items:
            producer.send(settings.topic(topic), key=key, value=value)
        producer.flush(30)
    finally:
        producer.close(10)


def drained(settings: Settings, group: str, topics: list[str]) -> bool:
    """The group has committed offsets on every one of `topics`, all at the log end."""
    from infra.admin import consumer_lag

    rows = consumer_lag(settings, group)
    names = {settings.topic(t) for t in topics}
    seen = {r.topic for r in rows if r.topic in names}
    return seen == names and all(r.lag == 0 for r in rows if r.topic in names)
