"""The local Redis: Debian's `redis-server`, installed and started only when nothing answers."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import redis

from infra.process import (
    LOCAL_HOSTS,
    Echo,
    ServiceError,
    ServiceStatus,
    read_pid,
    stderr,
    stop_pid,
    tail,
    wait_until,
)
from infra.settings import Settings


def redis_dir(settings: Settings) -> Path:
    return settings.data_dir / "redis"


def _redis_host_port(settings: Settings) -> tuple[str, int]:
    url = urlparse(settings.redis_url)
    return url.hostname or "127.0.0.1", url.port or 6379


def redis_answers(settings: Settings, timeout: float = 1.0) -> bool:
    """True when PING on `settings.redis_url` answers."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=timeout,
                                  socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def install_redis(echo: Echo = stderr) -> str:
    """Install `redis-server` with apt (as root, or via passwordless sudo); returns its path."""
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ServiceError("redis-server not found: install it (apt-get install redis-server)")
        prefix = ["sudo", "-n"]
    if shutil.which("apt-get") is None:
        raise ServiceError("redis-server not found and apt-get unavailable: install Redis 7+")
    echo("redis: redis-server not found; installing it with apt-get (one time) ...")
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    for args in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        done = subprocess.run([*prefix, *env, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr}")
    path = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                             if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        raise ServiceError("redis-server still not on PATH after apt-get install")
    return path


def start_redis(settings: Settings, timeout: float = 30.0, echo: Echo = stderr) -> int | None:
    """Start a daemonized `redis-server` on the URL's host/port; returns its pid."""
    binary = shutil.which("redis-server") or install_redis(echo)
    if redis_answers(settings):  # the Debian package's postinst may have started one
        return None
    host, port = _redis_host_port(settings)
    root = redis_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    pid_file = root / "redis.pid"
    echo(f"redis: starting redis-server on {host}:{port} (log: {root / 'redis.log'}) ...")
    cmd = [binary, "--bind", host, "--port", str(port), "--daemonize", "yes",
           "--dir", str(root), "--pidfile", str(pid_file), "--logfile", str(root / "redis.log")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"redis-server failed to start:\n{done.stdout}{done.stderr}")
    if not wait_until(lambda: redis_answers(settings), timeout, lambda: True):
        raise ServiceError(f"Redis did not answer on {settings.redis_url} within {timeout:.0f} s; "
                           f"see {root / 'redis.log'}:\n{tail(root / 'redis.log')}")
    return read_pid(pid_file, "redis-server")


def redis_status(settings: Settings) -> ServiceStatus:
    root = redis_dir(settings)
    pid = read_pid(root / "redis.pid", "redis-server")
    answering = redis_answers(settings)
    state = ("running" if pid else "external") if answering else "down"
    return ServiceStatus("redis", settings.redis_url, answering, pid, pid is not None, state,
                         str(root / "redis.log") if pid else None)


def ensure_redis(settings: Settings, timeout: float = 30.0, echo: Echo = stderr) -> ServiceStatus:
    """Make PING answer on `settings.redis_url`, installing/starting `redis-server` if needed."""
    status = redis_status(settings)
    if status.answering:
        return status
    host, _ = _redis_host_port(settings)
    if host not in LOCAL_HOSTS:
        raise ServiceError(f"Redis at {settings.redis_url} does not answer and is not local, "
                           "so it cannot be started here")
    pid = start_redis(settings, timeout, echo)
    return replace(redis_status(settings), state="started" if pid else "external")


def stop_redis(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the redis-server we started (pid file); an external one is left alone."""
    pid_file = redis_dir(settings) / "redis.pid"
    pid = read_pid(pid_file, "redis-server")
    if pid is None:
        return False
    stop_pid(pid, timeout)
    pid_file.unlink(missing_ok=True)
    return True
