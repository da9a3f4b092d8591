"""A three-node KRaft cluster on one machine, from the same jars as the single local broker.

What users run in production is a replicated cluster; tests and the cluster benchmark need one
too, without Docker. `lorastream infra up --brokers 3` starts N combined broker+controller
nodes on loopback (node i: client port `base + 2i`, controller port `base + 2i + 1`), a static
controller quorum of all of them, replication factor N for every topic and `min.insync.replicas`
N-1, so a producer with `acks=all` keeps writing while one node is down and nothing it was told
is written can be lost with that node. Each node keeps its data and pid file under
`<data_dir>/kafka-cluster/node-<i>/`; the cluster id is drawn once and kept beside them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.process import (
    Echo,
    ServiceError,
    host_port,
    port_open,
    read_pid,
    read_pid_state,
    stderr,
    stop_pid,
    tail,
    wait_until,
)
from infra.services import KafkaPaths, cluster_id, java_cmd, kafka_paths, resolve_kafka_jars
from infra.settings import Settings

MARKER = "kafka.Kafka"


@dataclass(frozen=True)
class Node:
    """One broker+controller of the cluster."""

    node_id: int
    host: str
    port: int
    paths: KafkaPaths

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def controller(self) -> str:
        return f"{self.host}:{self.port + 1}"


def free_block(width: int = 6, lo: int = 20000, hi: int = 32000) -> int:
    """A base port with `width` free ports from it, below the kernel's ephemeral range (a
    port picked there can be taken by a client's outgoing connection before a node binds it)."""
    import random
    import socket

    for _ in range(500):
        base = random.randrange(lo, hi - width)
        try:
            for port in range(base, base + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise ServiceError(f"no {width} free ports in {lo}-{hi}")


def cluster_root(settings: Settings) -> Path:
    return settings.data_dir / "kafka-cluster"


def nodes(settings: Settings, brokers: int = 3) -> list[Node]:
    """The nodes of an N-broker cluster whose first node is `settings.bootstrap_servers`'s
    first address (the others follow it two ports apart)."""
    host, base = host_port(settings.bootstrap_servers, 9092)
    host = "127.0.0.1" if host in ("localhost", "0.0.0.0") else host
    libs = kafka_paths(settings).libs
    out = []
    for i in range(brokers):
        root = cluster_root(settings) / f"node-{i + 1}"
        paths = KafkaPaths(root, libs, root / "data", root / "server.properties",
                           root / "broker.pid", root / "broker.log", root / "logs")
        out.append(Node(i + 1, host, base + 2 * i, paths))
    return out


def bootstrap(settings: Settings, brokers: int = 3) -> str:
    """The bootstrap list of the cluster (what `LORASTREAM_BOOTSTRAP_SERVERS` should say)."""
    return ",".join(n.address for n in nodes(settings, brokers))


def _properties(settings: Settings, node: Node, members: list[Node]) -> str:
    replicas = len(members)
    min_isr = max(1, replicas - 1)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(f"{m.node_id}@{m.controller}" for m in members),
        "listeners": f"PLAINTEXT://{node.address},CONTROLLER://{node.controller}",
        "advertised.listeners": f"PLAINTEXT://{node.address}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(node.paths.data),
        "num.partitions": str(settings.partitions),
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "unclean.leader.election.enable": "false",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.retention.check.interval.ms": "60000",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _cluster_id(settings: Settings) -> str:
    """The cluster's id, drawn once: every node must be formatted with the same one."""
    path = cluster_root(settings) / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    cid = cluster_id()
    path.write_text(cid + "\n")
    return cid


def _format(node: Node, cid: str) -> None:
    if (node.paths.data / "meta.properties").exists():
        return
    cmd = java_cmd(node.paths, "kafka.tools.StorageTool", "format", f"--cluster-id={cid}",
                   "-c", str(node.paths.props))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"formatting node {node.node_id} failed:\n{done.stdout}{done.stderr}")


def node_pid(node: Node) -> int | None:
    return read_pid(node.paths.pid_file, MARKER)


def start_node(settings: Settings, node: Node, members: list[Node]) -> int:
    """Start one node detached (formatting its storage the first time); returns its pid."""
    running = node_pid(node)
    if running is not None:
        return running
    node.paths.root.mkdir(parents=True, exist_ok=True)
    node.paths.props.write_text(_properties(settings, node, members))
    _format(node, _cluster_id(settings))
    cmd = java_cmd(node.paths, MARKER, str(node.paths.props), heap="-Xmx384m", logs="broker")
    cmd[2:2] = ["-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:TieredStopAtLevel=1"]
    with node.paths.log.open("ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=node.paths.root,
                                start_new_session=True)
    node.paths.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def brokers_answering(settings: Settings, timeout: float = 3.0) -> int:
    """How many brokers the cluster's metadata lists (0 when nothing answers)."""
    from infra.admin import admin_client

    if not any(port_open(*host_port(a, 9092)) for a in settings.bootstrap_servers.split(",")):
        return 0
    try:
        with admin_client(settings, timeout_s=timeout) as admin:
            return len(admin.describe_cluster().get("brokers") or ())
    except Exception:
        return 0


def ensure_cluster(settings: Settings, brokers: int = 3, timeout: float = 180.0,
                   echo: Echo = stderr) -> Settings:
    """Start whichever nodes are not running and wait until all N are in the metadata;
    returns the settings pointed at the whole cluster."""
    if brokers < 1:
        raise ServiceError("a cluster needs at least one broker")
    members = nodes(settings, brokers)
    clustered = settings.model_copy(update={"bootstrap_servers": bootstrap(settings, brokers)})
    if brokers_answering(clustered) >= brokers:
        return clustered
    resolve_kafka_jars(settings, echo)
    for node in members:
        if node_pid(node) is None and port_open(node.host, node.port):
            raise ServiceError(f"port {node.address} is taken by a process that is not node "
                               f"{node.node_id} of this cluster: choose another "
                               "LORASTREAM_BOOTSTRAP_SERVERS")
    echo(f"kafka: starting a {brokers}-node KRaft cluster on {clustered.bootstrap_servers} ...")
    pids = {n.node_id: start_node(settings, n, members) for n in members}

    def exited() -> list[int]:
        """Nodes whose process is gone: judged by the pids just started, not by re-reading
        pid files and command lines, so a JVM still starting never counts as dead."""
        return [i for i, pid in pids.items() if read_pid_state(pid) in ("", "Z")]

    started = time.monotonic()
    if not wait_until(lambda: brokers_answering(clustered) >= brokers, timeout,
                      lambda: not exited()):
        logs = "\n".join(f"node {n.node_id} ({n.paths.logs_dir}):\n"
                         f"{tail(n.paths.logs_dir / 'broker' / 'server.log', 8)}"
                         for n in members)
        why = (f"node(s) {exited()} exited" if exited()
               else f"not all {brokers} brokers answered within {time.monotonic() - started:.0f} s")
        raise ServiceError(f"the cluster did not come up: {why}:\n{logs}")
    return clustered


def stop_node(node: Node, timeout: float = 60.0, kill: bool = False) -> bool:
    """Stop one node (SIGTERM, or SIGKILL as a crash); True if it was running."""
    pid = node_pid(node)
    if pid is None:
        return False
    if kill:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: node_pid(node) is None, timeout, lambda: True)
    else:
        stop_pid(pid, timeout)
    node.paths.pid_file.unlink(missing_ok=True)
    return True


def stop_cluster(settings: Settings, brokers: int = 3, timeout: float = 60.0) -> int:
    """Stop every node we started, all at once (one by one, the last nodes wait for a
    controller quorum that is already gone); returns how many were running."""
    return stop_nodes(nodes(settings, brokers), timeout)


def stop_nodes(members: list[Node], timeout: float = 60.0) -> int:
    running = [(n, pid) for n in members if (pid := node_pid(n)) is not None]
    for _, pid in running:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: all(node_pid(n) is None for n, _ in running), timeout, lambda: True)
    for node, pid in running:
        if node_pid(node) is not None:
            os.kill(pid, signal.SIGKILL)
        node.paths.pid_file.unlink(missing_ok=True)
    return len(running)


def running_nodes(settings: Settings) -> list[Node]:
    """Nodes of a cluster started here whose process is alive (for `infra status`/`down`)."""
    root = cluster_root(settings)
    count = len(list(root.glob("node-*"))) if root.is_dir() else 0
    return [n for n in nodes(settings, count) if node_pid(n) is not None]
