"""A private Kafka broker, Redis and worker that a fault benchmark or test may kill at will.

The shared development broker and Redis serve other test suites, so faults are injected into a
stack of their own: a KRaft broker and a `redis-server` (append-only file, fsync every second,
as a production Redis that must survive a crash would run) on free loopback ports under a
scratch directory, plus `lorastream worker` processes. Everything is stopped on `close()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from infra import admin, services
from infra.process import stop_child
from infra.settings import REPO_ROOT, Settings, settings_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kafka_ports() -> int:
    """A port p with p+1 free too (the KRaft controller listens on p+1)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair for Kafka")


@dataclass
class FaultStack:
    root: Path
    settings: Settings = field(init=False)
    redis_proc: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        base = Settings().model_dump()
        self.settings = Settings(**{
            **base, "bootstrap_servers": f"127.0.0.1:{_kafka_ports()}",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0", "data_dir": self.root / "data",
            "artifact_dir": self.root / "artifacts", "topic_prefix": "faults.",
            "app_id": "faults", "redis_prefix": "faults:", "partitions": 4})

    # -- services -------------------------------------------------------------------------
    def start(self) -> FaultStack:
        self.start_redis()
        self.start_kafka()
        admin.create_topics(self.settings)
        return self

    def start_kafka(self) -> None:
        libs = services.kafka_paths(self.settings).libs
        shared = services.kafka_paths(Settings()).libs
        if not libs.exists() and shared.is_dir():  # reuse the jars `infra up` resolved
            libs.parent.mkdir(parents=True, exist_ok=True)
            libs.symlink_to(shared, target_is_directory=True)
        services.start_kafka(self.settings, timeout=180, echo=lambda m: None)

    def stop_kafka(self) -> None:
        services.stop_kafka(self.settings, timeout=60)

    def start_redis(self) -> None:
        port = self.settings.redis_url.rsplit(":", 1)[1].split("/")[0]
        d = self.root / "redis"
        d.mkdir(exist_ok=True)
        binary = shutil.which("redis-server") or "redis-server"
        self.redis_proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", port, "--dir", str(d), "--appendonly",
             "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.settings.redis_url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not answer")

    def kill_redis(self) -> None:
        if self.redis_proc is not None:
            self.redis_proc.send_signal(signal.SIGKILL)
            self.redis_proc.wait(30)

    # -- workers ----------------------------------------------------------------------------
    def start_worker(self, stages: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"worker-{stages}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "--stages", stages],
                env={**os.environ, **settings_env(self.settings)}, cwd=REPO_ROOT, stdout=out,
                stderr=subprocess.STDOUT)
        self.workers[stages] = proc
        return proc

    def kill_worker(self, stages: str) -> None:
        proc = self.workers[stages]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def close(self) -> None:
        for proc in self.workers.values():
            stop_child(proc)
        self.stop_kafka()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(30)
