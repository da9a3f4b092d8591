"""Local Kafka broker (and, re-exported, Redis): start once, find again, stop only ours.

The pipeline needs a real broker and a real Redis. On a developer box or in CI there is none, so
`lorastream infra up` starts a single-node KRaft broker from Maven-resolved jars (no Docker, no
tarball) and a `redis-server`, both detached and recorded by pid files under `settings.data_dir`.
If something already answers on the configured address it is used as is ("external") and never
stopped by us, so the same commands work against a shared or managed cluster.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from infra.process import (
    LOCAL_HOSTS,
    Echo,
    ServiceError,
    ServiceStatus,
    host_port,
    port_open,
    read_pid,
    stderr,
    stop_pid,
    tail,
    wait_until,
)
from infra.redis_service import (
    ensure_redis,
    install_redis,
    redis_answers,
    redis_dir,
    redis_status,
    start_redis,
    stop_redis,
)
from infra.settings import Settings

__all__ = [
    "ServiceError",
    "ServiceStatus",
    "ensure_kafka",
    "ensure_redis",
    "install_redis",
    "kafka_status",
    "redis_answers",
    "redis_dir",
    "redis_status",
    "start_kafka",
    "start_redis",
    "stop_kafka",
    "stop_redis",
]

KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J2 = KAFKA_DIR / "log4j2.xml"


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
    if not port_open(host, port):
        return False
    from infra.admin import admin_client  # local import: admin imports this module's helpers

    try:
        with admin_client(settings, timeout_s=timeout) as admin:
            return bool(admin.describe_cluster().get("brokers"))
    except Exception:
        return False


def resolve_kafka_jars(settings: Settings, echo: Echo = stderr) -> Path:
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


def cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, url-safe base64 without padding.

    Url-safe base64 may begin with `-`, which the storage tool's parser reads as an option
    (`--cluster-id/-t: expected one argument`: one start in 64 failed). Kafka's own
    `Uuid.randomUuid()` draws again in that case; so does this.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def java_cmd(paths: KafkaPaths, main: str, *args: str, heap: str = "-Xmx256m",
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
    cmd = java_cmd(kafka_paths(settings), main, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _format_storage(paths: KafkaPaths) -> None:
    """Format the KRaft log dir once (meta.properties marks a formatted dir)."""
    if (paths.data / "meta.properties").exists():
        return
    cmd = java_cmd(paths, "kafka.tools.StorageTool", "format", "--standalone",
                    f"--cluster-id={cluster_id()}", "-c", str(paths.props))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"formatting Kafka storage failed:\n{done.stdout}{done.stderr}")


def start_kafka(settings: Settings, timeout: float = 120.0, echo: Echo = stderr) -> int:
    """Start our broker detached and wait until it answers; returns its pid."""
    paths = kafka_paths(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    resolve_kafka_jars(settings, echo)
    paths.props.write_text(_server_properties(settings, paths))
    _format_storage(paths)
    cmd = java_cmd(paths, "kafka.Kafka", str(paths.props), heap="-Xmx768m", logs="broker")
    cmd[2:2] = ["-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    echo(f"kafka: starting broker on {settings.bootstrap_servers} (log: {paths.log}) ...")
    with paths.log.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=paths.root, start_new_session=True)
    paths.pid_file.write_text(f"{proc.pid}\n")
    _wait_kafka(settings, timeout, lambda: proc.poll() is None)
    return proc.pid


def _wait_kafka(settings: Settings, timeout: float, alive: Callable[[], bool]) -> None:
    if not wait_until(lambda: kafka_answers(settings), timeout, alive):
        log = kafka_paths(settings).log
        raise ServiceError(
            f"Kafka did not answer on {settings.bootstrap_servers} within {timeout:.0f} s; "
            f"see {log}:\n{tail(log)}")


def kafka_status(settings: Settings) -> ServiceStatus:
    paths = kafka_paths(settings)
    pid = read_pid(paths.pid_file, "kafka.Kafka")
    answering = kafka_answers(settings)
    state = ("running" if pid else "external") if answering else "down"
    return ServiceStatus("kafka", settings.bootstrap_servers, answering, pid, pid is not None,
                         state, str(paths.log) if pid else None)


def ensure_kafka(settings: Settings, timeout: float = 120.0, echo: Echo = stderr) -> ServiceStatus:
    """Make Kafka answer on `settings.bootstrap_servers`, starting a local broker if needed."""
    paths = kafka_paths(settings)
    pid = read_pid(paths.pid_file, "kafka.Kafka")
    if pid is not None and not kafka_answers(settings):  # ours, still booting
        _wait_kafka(settings, timeout, lambda: read_pid(paths.pid_file, "kafka.Kafka") is not None)
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
    pid = read_pid(paths.pid_file, "kafka.Kafka")
    if pid is None:
        return False
    stop_pid(pid, timeout)
    paths.pid_file.unlink(missing_ok=True)
    return True
