"""What the local services share: status records, pid files, polling with a deadline.

A pid file alone is not trusted: a pid is only signalled if its command line still names the
service, so a recycled pid never hits an unrelated process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Echo = Callable[[str], None]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
POLL_S = 0.2


class ServiceError(RuntimeError):
    """A service could not be started or found; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    """Where a service runs and whether we own it (`managed`: started by us, has a pid file)."""

    name: str
    address: str
    answering: bool
    pid: int | None
    managed: bool
    state: str  # "started" | "running" | "external" | "down"
    log: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """First `host:port` of a comma-separated bootstrap list (IPv6 in brackets allowed)."""
    first = address.split(",")[0].strip()
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, _, port = first.rpartition(":")
    return (host, int(port)) if host else (first, default_port)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in `pid_file` if that process is alive and its command line contains `marker`.

    The marker check guards against a recycled pid: we must never signal an unrelated process.
    """
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM, wait for the process to exit, SIGKILL if it will not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: read_pid_state(pid) in ("", "Z"), timeout, lambda: True):
        os.kill(pid, signal.SIGKILL)


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Stop a child we started: SIGTERM (a worker commits on the way out), then SIGKILL if it
    hangs; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def read_pid_state(pid: int) -> str:
    """Process state letter from /proc ("Z" zombie: exited, not yet reaped); "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(predicate: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll `predicate` until true, the deadline passes, or the process dies (`alive` false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not alive():
            return predicate()
        time.sleep(POLL_S)
    return False
