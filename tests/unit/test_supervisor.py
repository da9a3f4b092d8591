"""The worker supervisor: crashes are restarted with backoff, stops are not, loops give up.

The supervised children are real processes (tiny Python scripts standing in for a worker), so
the exit codes, signals and restarts are the operating system's, not a mock's.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from streams.cli.supervisor import CrashHistory, RestartPolicy, Supervisor
from tests.support.waiting import wait_for

FAST = RestartPolicy(base_s=0.01, max_s=0.05, stable_s=60.0, max_crashes=50, window_s=600.0)

# Counts its starts in a file; exits 75 (the worker's crash-only exit) the first `crashes`
# times, then runs until it gets SIGTERM, like a healthy worker.
CHILD = """
import pathlib, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
runs = pathlib.Path(sys.argv[1]); n = int(runs.read_text() or 0) + 1 if runs.exists() else 1
runs.write_text(str(n))
if n <= int(sys.argv[2]):
    sys.exit(75)
while True:
    signal.pause()
"""


def _child(tmp_path: Path, crashes: int) -> tuple[list[str], Path]:
    script, runs = tmp_path / "child.py", tmp_path / "runs"
    script.write_text(CHILD)
    return [sys.executable, str(script), str(runs), str(crashes)], runs


def _starts(runs: Path) -> int:
    return int(runs.read_text() or 0) if runs.exists() else 0


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(base_s=1.0, max_s=8.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_stable_run_resets_the_backoff_and_a_crash_loop_gives_up() -> None:
    history = CrashHistory.new(RestartPolicy(base_s=1.0, stable_s=10.0, max_crashes=3,
                                             window_s=100.0))
    assert history.record(now=0.0, ran_s=1.0) == 1.0
    assert history.record(now=1.0, ran_s=1.0) == 2.0
    assert history.record(now=20.0, ran_s=15.0) == 1.0  # ran long enough: not a loop
    assert history.record(now=21.0, ran_s=0.5) is None  # 4 crashes within 100 s


def test_crashed_worker_is_restarted_until_it_runs_then_stops_cleanly(tmp_path: Path) -> None:
    argv, runs = _child(tmp_path, crashes=2)
    supervisor = Supervisor(argv, FAST)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()))
    thread.start()
    try:
        wait_for(lambda: _starts(runs) == 3, 30, message="two restarts after exit 75")
        wait_for(lambda: supervisor.child is not None and supervisor.child.poll() is None, 30)
    finally:
        supervisor.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert result == [0]  # the healthy worker's own exit on SIGTERM
    assert supervisor.restarts == 2
    assert _starts(runs) == 3  # stopping is not a crash: no restart after it


def test_crash_loop_ends_with_the_workers_exit_code(tmp_path: Path) -> None:
    argv, runs = _child(tmp_path, crashes=10**6)
    policy = RestartPolicy(base_s=0.01, max_s=0.01, max_crashes=3, window_s=600.0)
    assert Supervisor(argv, policy).run() == 75
    assert _starts(runs) == 4
