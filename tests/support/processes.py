"""The real CLI as a subprocess, pointed at one test's namespace: workers, engines and the
dashboard started in the background (output to a log file), one-shot commands run to the end,
and a free local port for a process to listen on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from infra.process import stop_child
from infra.settings import REPO_ROOT, Settings, settings_env


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings_env(settings)}


def lorastream(settings: Settings, *args: str, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    """Run `lorastream ARGS...` to the end with exactly these settings; output captured."""
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO_ROOT,
                          env=_env(settings), capture_output=True, text=True, timeout=timeout,
                          check=False)


def start_cli(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`lorastream ARGS...` in the background with exactly these settings; output appended to
    `log`. Stop it with `stop_process`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "streams.cli", *args], env=_env(settings),
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)


def start_worker(settings: Settings, stages: str, log: Path, *extra: str
                 ) -> subprocess.Popen[bytes]:
    """`lorastream worker --stages STAGES [EXTRA...]` with exactly these settings."""
    return start_cli(settings, log, "worker", "--stages", stages, *extra)


def stop_process(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM (a worker commits on the way out), then SIGKILL if it hangs; print the log of a
    process that did not stop cleanly."""
    if stop_child(proc) not in (0, -15, 137) and log.exists():
        print(log.read_text(errors="replace")[-4000:])


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
