"""`lorastream worker --supervise`: restart a crashed worker, so crash-only exits are safe.

A worker exits on purpose when something unhandled happens mid-batch (exit 75: nothing of the
batch is acked, Kafka redelivers it) and dies for real when killed or out of memory. Either way
the fix is the same: start it again, and the seen-marks and step journal make the redelivered
work idempotent. Production can use systemd or Kubernetes for this; the supervisor is for
everything else (a laptop, a VM, CI, the benchmarks), so a bare `lorastream worker` never has to
be babysat.

Policy: any exit that was not asked for (not after SIGTERM/SIGINT to the supervisor) is a crash
and is restarted after a backoff that doubles from `base_s` up to `max_s` and resets once a
worker has run `stable_s`; more than `max_crashes` crashes within `window_s` is a crash loop
(a bug, a broken config), and the supervisor gives up with the worker's exit code instead of
spinning.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from workers.pipeline.preflight import EX_CONFIG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    max_crashes: int = 20
    window_s: float = 600.0

    def backoff(self, consecutive: int) -> float:
        """Delay before the `consecutive`-th restart in a row (1-based)."""
        return min(self.max_s, self.base_s * 2 ** max(0, consecutive - 1))


@dataclass
class CrashHistory:
    """When the worker crashed, to tell a crash loop from occasional crashes."""

    policy: RestartPolicy
    times: deque[float]
    consecutive: int = 0

    @classmethod
    def new(cls, policy: RestartPolicy) -> CrashHistory:
        return cls(policy, deque())

    def record(self, now: float, ran_s: float) -> float | None:
        """Note a crash after a run of `ran_s`; the delay before restarting, or None to give
        up (a crash loop)."""
        self.consecutive = 1 if ran_s >= self.policy.stable_s else self.consecutive + 1
        self.times.append(now)
        while self.times and now - self.times[0] > self.policy.window_s:
            self.times.popleft()
        if len(self.times) > self.policy.max_crashes:
            return None
        return self.policy.backoff(self.consecutive)


class Supervisor:
    """Runs `argv` as a child and restarts it on every exit nobody asked for."""

    def __init__(self, argv: Sequence[str], policy: RestartPolicy | None = None,
                 spawn: Callable[[Sequence[str]], subprocess.Popen[bytes]] | None = None) -> None:
        self.argv = list(argv)
        self.policy = policy or RestartPolicy()
        self._spawn = spawn or (lambda a: subprocess.Popen(list(a)))
        self._stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Stop for good: pass the signal on to the worker (it commits on the way out)."""
        self._stopping.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self) -> int:
        """Supervise until stopped (the worker's last exit code) or a crash loop (its code)."""
        history = CrashHistory.new(self.policy)
        while True:
            started = time.monotonic()
            self.child = self._spawn(self.argv)
            code = self.child.wait()
            if self._stopping.is_set():
                return code
            if code == EX_CONFIG:  # misconfigured: a restart would only say it again
                log.critical("worker refused to start (exit %d: configuration); not restarting",
                             code)
                return code
            delay = history.record(time.monotonic(), time.monotonic() - started)
            if delay is None:
                log.critical("worker crashed %d times in %.0f s (last exit %s): giving up",
                             len(history.times), self.policy.window_s, code)
                return code or 1
            self.restarts += 1
            log.warning("worker exited with %s; restart %d in %.1f s", code, self.restarts,
                        delay)
            if self._stopping.wait(delay):  # stopped during the backoff
                return code


def supervise(argv: Sequence[str], policy: RestartPolicy | None = None) -> int:
    """Run `argv` under a `Supervisor` with SIGTERM/SIGINT forwarded; its exit code."""
    supervisor = Supervisor(argv, policy)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()
