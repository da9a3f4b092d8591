"""`lorastream worker --supervise` on the real broker and Redis: a worker SIGKILLed mid-stream
is started again by its supervisor, and every event still ends in exactly one output."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

from infra.settings import Settings
from loadtests.faults import make_events
from schemas.ids import derive_id
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import start_worker
from tests.support.waiting import wait_for


def _children(proc: subprocess.Popen[bytes]) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(proc.pid).children() if c.is_running()]
    except psutil.NoSuchProcess:
        return []


def _outputs(settings: Settings) -> list[str]:
    return [e["event_id"] for e in read_topic(settings, "rewards")]


def test_killed_worker_is_restarted_and_nothing_is_lost(settings: Settings,
                                                         tmp_path: Path) -> None:
    events = make_events(400)
    expected = sorted(derive_id("reward", event_id) for event_id, _, _ in events)
    log = tmp_path / "supervised.log"
    supervisor = start_worker(settings, "reward", log, "--supervise")
    try:
        produce_raw(settings, "rollouts", [(k, v) for _, k, v in events[:200]])
        wait_for(lambda: len(_outputs(settings)) >= 200, 120, interval=0.5,
                 message="the first half scored")
        (first,) = wait_for(lambda: _children(supervisor), 30)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _children(supervisor) not in ([], [first]), 60,
                 message="the supervisor started a new worker")
        produce_raw(settings, "rollouts", [(k, v) for _, k, v in events[200:]])
        wait_for(lambda: len(set(_outputs(settings))) >= len(events), 180, interval=0.5,
                 message="every event scored after the restart")
        assert sorted(set(_outputs(settings))) == expected  # nothing lost, nothing foreign
        assert supervisor.poll() is None
    finally:
        supervisor.terminate()
        code = supervisor.wait(60)
    assert code == 0, log.read_text(errors="replace")[-3000:]  # a stop, not a crash
    assert "restart 1" in log.read_text(errors="replace")
