"""Local Kafka broker and Redis server: start once, find again, stop only what we started.

The pipeline needs a real broker and a real Redis. On a developer box or in CI there is none, so
`lorastream infra up` starts a single-node KRaft broker from Maven-resolved jars (no Docker, no
tarball) and a `redis-server`, both detached and recorded by pid files under `settings.data_dir`.
If something already answers on the configured address it is used as is ("external") and never
stopped by us, so the same commands work against a shared or managed cluster.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from infra.settings import Settings

Echo = Callable[[str], None]
KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J2 = KAFKA_DIR / "log4j2.xml"
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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """First `host:port` of a comma-separated bootstrap list (IPv6 in brackets allowed)."""
    first = address.split(",")[0].strip()
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, _, port = first.rpartition(":")
    return (host, int(port)) if host else (first, default_port)


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in `pid_file` if that process is alive and its command line contains `marker`.

    The marker check guards against a recycled pid: we must never signal an unrelated process.
    """
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def _stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM, wait for the process to exit, SIGKILL if it will not."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait(lambda: _read_pid_state(pid) in ("", "Z"), timeout, lambda: True):
        os.kill(pid, signal.SIGKILL)


def _read_pid_state(pid: int) -> str:
    """Process state letter from /proc ("Z" zombie: exited, not yet reaped); "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(predicate: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll `predicate` until true, the deadline passes, or the process dies (`alive` false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not alive():
            return predicate()
        time.sleep(POLL_S)
    return False


# ----------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class KafkaPaths:
    """Everything the local broker keeps under `<data_dir>/kafka`."""

    root: Path
    libs: Path
    data: Path
    props: Path
    pid_file: Path
    log: Path
    logs_dir: Path


def kafka_paths(settings: Settings) -> KafkaPaths:
    root = settings.data_dir / "kafka"
    return KafkaPaths(root, root / "libs", root / "data", root / "server.properties",
                      root / "broker.pid", root / "broker.log", root / "logs")


def kafka_answers(settings: Settings, timeout: float = 3.0) -> bool:
    """True when the bootstrap address answers a metadata request with at least one broker.

    A plain TCP check is not enough: the port can accept before the broker serves requests.
    """
    host, port = host_port(settings.bootstrap_servers, 9092)
    if not _port_open(host, port):
        return False
    from infra.admin import admin_client  # local import: admin imports this module's helpers

    try:
        with admin_client(settings, timeout_s=timeout) as admin:
            return bool(admin.describe_cluster().get("brokers"))
    except Exception:
        return False


def resolve_kafka_jars(settings: Settings, echo: Echo = _stderr) -> Path:
    """Copy the broker + tools jars into `<data_dir>/kafka/libs` once (again if the pom changes)."""
    paths = kafka_paths(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    stamp = hashlib.sha256(POM.read_bytes()).hexdigest()
    stamp_file = paths.libs / ".pom.sha256"
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return paths.libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("mvn not found: install Maven (apt-get install -y maven) and Java 17+")
    echo(f"kafka: resolving broker jars with Maven into {paths.libs} (first run only) ...")
    tmp = paths.root / "libs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={tmp}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"resolving Kafka jars failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}")
    (tmp / ".pom.sha256").write_text(stamp + "\n")
    shutil.rmtree(paths.libs, ignore_errors=True)
    tmp.rename(paths.libs)
    return paths.libs


def _server_properties(settings: Settings, paths: KafkaPaths) -> str:
    host, port = host_port(settings.bootstrap_servers, 9092)
    host = "127.0.0.1" if host in LOCAL_HOSTS else host
    ctl = f"{host}:{port + 1}"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": ctl,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{ctl}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(paths.data),
        "num.partitions": str(settings.partitions),
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Pipeline topics are created explicitly (infra.admin), but Faust creates its own
        # changelog/assignor topics and may touch a topic before creating it; auto-create keeps
        # a local run tolerant of that instead of failing on UNKNOWN_TOPIC_OR_PARTITION.
        "auto.create.topics.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        "log.retention.check.interval.ms": "60000",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, url-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def _java_cmd(paths: KafkaPaths, main: str, *args: str, heap: str = "-Xmx256m",
              logs: str = "tools") -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise ServiceError("java not found: install a JDK 17+ (apt-get install -y openjdk-17-jdk)")
    return [java, heap, "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J2}",
            f"-Dkafka.logs.dir={paths.logs_dir / logs}", "-cp", f"{paths.libs}/*", main, *args]


def run_kafka_tool(settings: Settings, main: str, *args: str,
                   timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a Kafka CLI main class (e.g. `org.apache.kafka.tools.TopicCommand`) from our jars.

    Kafka's shell scripts are thin wrappers around these classes; this gives the same tools
    without a Kafka distribution. Jars are resolved on first use.
    """
    resolve_kafka_jars(settings)
    cmd = _java_cmd(kafka_paths(settings), main, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _format_storage(paths: KafkaPaths) -> None:
    """Format the KRaft log dir once (meta.properties marks a formatted dir)."""
    if (paths.data / "meta.properties").exists():
        return
    cmd = _java_cmd(paths, "kafka.tools.StorageTool", "format", "--standalone",
                    "-t", _cluster_id(), "-c", str(paths.props))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"formatting Kafka storage failed:\n{done.stdout}{done.stderr}")


def start_kafka(settings: Settings, timeout: float = 120.0, echo: Echo = _stderr) -> int:
    """Start our broker detached and wait until it answers; returns its pid."""
    paths = kafka_paths(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    resolve_kafka_jars(settings, echo)
    paths.props.write_text(_server_properties(settings, paths))
    _format_storage(paths)
    cmd = _java_cmd(paths, "kafka.Kafka", str(paths.props), heap="-Xmx768m", logs="broker")
    cmd[2:2] = ["-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    echo(f"kafka: starting broker on {settings.bootstrap_servers} (log: {paths.log}) ...")
    with paths.log.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=paths.root, start_new_session=True)
    paths.pid_file.write_text(f"{proc.pid}\n")
    _wait_kafka(settings, timeout, lambda: proc.poll() is None)
    return proc.pid


def _wait_kafka(settings: Settings, timeout: float, alive: Callable[[], bool]) -> None:
    if not _wait(lambda: kafka_answers(settings), timeout, alive):
        log = kafka_paths(settings).log
        raise ServiceError(
            f"Kafka did not answer on {settings.bootstrap_servers} within {timeout:.0f} s; "
            f"see {log}:\n{_tail(log)}")


def kafka_status(settings: Settings) -> ServiceStatus:
    paths = kafka_paths(settings)
    pid = _read_pid(paths.pid_file, "kafka.Kafka")
    answering = kafka_answers(settings)
    state = ("running" if pid else "external") if answering else "down"
    return ServiceStatus("kafka", settings.bootstrap_servers, answering, pid, pid is not None,
                         state, str(paths.log) if pid else None)


def ensure_kafka(settings: Settings, timeout: float = 120.0, echo: Echo = _stderr) -> ServiceStatus:
    """Make Kafka answer on `settings.bootstrap_servers`, starting a local broker if needed."""
    paths = kafka_paths(settings)
    pid = _read_pid(paths.pid_file, "kafka.Kafka")
    if pid is not None and not kafka_answers(settings):  # ours, still booting
        _wait_kafka(settings, timeout, lambda: _read_pid(paths.pid_file, "kafka.Kafka") is not None)
    status = kafka_status(settings)
    if status.answering:
        return status
    host, _ = host_port(settings.bootstrap_servers, 9092)
    if host not in LOCAL_HOSTS:
        raise ServiceError(f"Kafka at {settings.bootstrap_servers} does not answer and is not "
                           "local, so it cannot be started here")
    start_kafka(settings, timeout, echo)
    return replace(kafka_status(settings), state="started")


def stop_kafka(settings: Settings, timeout: float = 60.0) -> bool:
    """Stop the broker we started (pid file); an external broker is left alone. True if stopped."""
    paths = kafka_paths(settings)
    pid = _read_pid(paths.pid_file, "kafka.Kafka")
    if pid is None:
        return False
    _stop_pid(pid, timeout)
    paths.pid_file.unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------- Redis


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


def install_redis(echo: Echo = _stderr) -> str:
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


def start_redis(settings: Settings, timeout: float = 30.0, echo: Echo = _stderr) -> int | None:
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
    if not _wait(lambda: redis_answers(settings), timeout, lambda: True):
        raise ServiceError(f"Redis did not answer on {settings.redis_url} within {timeout:.0f} s; "
                           f"see {root / 'redis.log'}:\n{_tail(root / 'redis.log')}")
    return _read_pid(pid_file, "redis-server")


def redis_status(settings: Settings) -> ServiceStatus:
    root = redis_dir(settings)
    pid = _read_pid(root / "redis.pid", "redis-server")
    answering = redis_answers(settings)
    state = ("running" if pid else "external") if answering else "down"
    return ServiceStatus("redis", settings.redis_url, answering, pid, pid is not None, state,
                         str(root / "redis.log") if pid else None)


def ensure_redis(settings: Settings, timeout: float = 30.0, echo: Echo = _stderr) -> ServiceStatus:
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
    pid = _read_pid(pid_file, "redis-server")
    if pid is None:
        return False
    _stop_pid(pid, timeout)
    pid_file.unlink(missing_ok=True)
    return True
