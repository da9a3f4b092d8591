"""The whole pipeline scaled out on a three-broker cluster, under faults, then audited.

`python -m loadtests.cluster --json [--events 20000] [--policies 64]`

On a private stack (`loadtests/fault_stack.py`'s AOF Redis, a three-node KRaft cluster from
`infra/cluster.py`: replication factor 3, `min.insync.replicas` 2) run two workers for every
stage (`rollout,reward` x2, `update` x2, `export,evaluate,promote` x2, each pair one consumer
group) and two CPU engines (`lorastream engine`; the workers fail over between them) on a tiny
Llama, push N interaction logs over P policies (plus a few held-out prompts per policy) in
chunks with `acks=all`, at most `AHEAD` ahead of training, and by share of N trained inject:
15% SIGKILL a broker, 30% SIGKILL update worker B, 45% restart it, 60% SIGKILL an engine, 75%
SIGKILL update worker A and start it again at once (each update-worker change is a rebalance
of the update group); the broker and the engine are restarted at 90%. A worker that exits by
itself is restarted (as a supervisor would). Then wait until every group has consumed
everything.

Audit, from the topics and the catalog: `lost` = training interactions in no trainer step and
not dead-lettered; `duplicated` = interactions trained in more than one distinct step;
`stale_steps` = (policy, step) numbers carried by more than one distinct update (two workers
advanced one policy); `step_gaps` = step numbers missing below a policy's newest step;
`revision_gaps` = catalog revision numbers missing below a policy's head; `rebalances` =
partition assignments of the update group (from its workers' logs); `resume_s` = from each
update-worker fault to the first step trained after it. Progress on stderr; the last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

from infra import admin, cluster
from infra.process import stop_child
from infra.settings import REPO_ROOT, Settings, settings_env
from loadtests.fault_stack import FaultStack
from loadtests.faults import Producer, _retrying, read_ids
from schemas.codec import encode_event
from schemas.events import InteractionLogged
from streams.app import group_id
from workers.catalog.index import CatalogIndex
from workers.models.base import build_tiny_model

GROUPS = {"front": "rollout,reward", "update": "update", "back": "export,evaluate,promote"}
SCHEDULE = ((0.15, "kill-broker"), (0.30, "kill-update-b"), (0.45, "start-update-b"),
            (0.60, "kill-engine"), (0.75, "restart-update-a"), (0.90, "restore"))
FAULTS = {"kill-broker", "kill-update-b", "kill-engine", "restart-update-a"}
HELD_OUT = 2
AHEAD = 4000
"""How far the producer runs ahead of training: faults are scheduled by training progress, and
the producer keeps sending (and retrying chunks a broker fault fails) throughout."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Eight model processes on a few cores: one intra-op thread each (two OpenMP teams per core
make every barrier sleep; a tiny model's step took 5x longer)."""


def log(msg: str) -> None:
    print(f"[cluster-bench] {msg}", file=sys.stderr, flush=True)


class ClusterStack(FaultStack):
    """FaultStack's private Redis and workers, over a three-node cluster, plus two engines."""

    def __post_init__(self) -> None:
        super().__post_init__()
        model = build_tiny_model(self.root / "tiny")
        first = self.settings.model_copy(update={"bootstrap_servers":
                                                 f"127.0.0.1:{cluster.free_block()}"})
        self.members = cluster.nodes(first, 3)
        self.engine_ports = [cluster.free_block(1), cluster.free_block(1)]
        self.settings = first.model_copy(update={
            "bootstrap_servers": cluster.bootstrap(first, 3), "base_model": model,
            "topic_prefix": "cl.", "app_id": "cl", "redis_prefix": "cl:", "partitions": 4,
            "group_size": 2, "max_new_tokens": 2, "update_batch": 4, "max_in_flight": 8,
            "export_every": 8, "session_timeout_s": 10.0})
        self.engines: dict[int, subprocess.Popen[bytes]] = {}
        self.extra: dict[str, subprocess.Popen[bytes]] = {}

    def start_kafka(self) -> None:
        libs = self.root / "data" / "kafka" / "libs"
        shared = Settings().data_dir / "kafka" / "libs"
        if not libs.exists() and shared.is_dir():
            libs.parent.mkdir(parents=True, exist_ok=True)
            libs.symlink_to(shared, target_is_directory=True)
        cluster.ensure_cluster(self.settings, 3, timeout=300, echo=lambda m: None)

    def stop_kafka(self) -> None:
        cluster.stop_nodes(self.members)

    def engine_url(self, first: int) -> str:
        order = [first, 1 - first]
        return ",".join(f"http://127.0.0.1:{self.engine_ports[i]}" for i in order)

    def start_engine(self, i: int) -> None:
        with open(self.root / f"engine-{i}.log", "ab") as out:
            self.engines[i] = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "engine", "--port",
                 str(self.engine_ports[i]), "--engine-id", f"e{i}", "--max-lora-rank", "8",
                 "--max-loaded-loras", "64"],
                env={**os.environ, **ONE_THREAD, **settings_env(self.settings)}, cwd=REPO_ROOT,
                stdout=out, stderr=subprocess.STDOUT)

    def wait_engines(self, timeout_s: float = 300.0) -> None:
        """Workers check at start-up that an engine answers: start them once both do."""
        from workers.serving.client import SGLangClient

        deadline = time.monotonic() + timeout_s
        for port in self.engine_ports:
            while not SGLangClient(f"http://127.0.0.1:{port}", timeout=2).health():
                if time.monotonic() > deadline:
                    raise TimeoutError("the engines did not come up")
                time.sleep(0.5)

    def start_named(self, name: str, stages: str, engine: int) -> None:
        s = self.settings.model_copy(update={"engine_url": self.engine_url(engine)})
        with open(self.root / f"worker-{name}.log", "ab") as out:
            self.extra[name] = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "--stages", stages],
                env={**os.environ, **ONE_THREAD, **settings_env(s)}, cwd=REPO_ROOT,
                stdout=out, stderr=subprocess.STDOUT)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def close(self) -> None:
        for proc in [*self.extra.values(), *self.engines.values()]:
            stop_child(proc)
        super().close()


def _interactions(n: int, policies: int) -> tuple[list[tuple[str, bytes, bytes]], list[str]]:
    """(id, key, value) of the held-out prompts first, then of N training interactions."""
    held = [InteractionLogged(policy_id=f"u{p}", prompt=f"held {k}?", task="length",
                              task_params={"target_chars": 4}, split="eval")
            for p in range(policies) for k in range(HELD_OUT)]
    train = [InteractionLogged(policy_id=f"u{i % policies}", prompt=f"q{i}?", task="length",
                               task_params={"target_chars": i % 7}) for i in range(n)]
    rows = [(e.event_id, e.policy_id.encode(), encode_event(e)) for e in [*held, *train]]
    return rows, [e.event_id for e in train]


def _trained(s: Settings) -> int:
    """Rewards the update group has consumed (committed offsets move after handling)."""
    rows = admin.consumer_lag(s, group_id(s, ["update"]))
    return sum(r.committed for r in rows if r.topic == s.topic("rewards"))


def _drained(s: Settings) -> bool:
    for stages in GROUPS.values():
        rows = admin.consumer_lag(s, group_id(s, stages.split(",")))
        if not rows or any(r.lag for r in rows):
            return False
    return True


def _supervise(stack: ClusterStack, down: set[str]) -> int:
    restarted = 0
    for name, proc in list(stack.extra.items()):
        if name not in down and proc.poll() is not None:
            log(f"worker {name} exited ({proc.returncode}); restarting it")
            group = name.split("-")[0]
            stack.start_named(name, GROUPS[group], engine=int(name.endswith("b")))
            restarted += 1
    return restarted


def inject(stack: ClusterStack, kind: str, down: set[str]) -> None:
    if kind == "kill-broker":
        cluster.stop_node(stack.members[2], kill=True)
    elif kind == "kill-update-b":
        down.add("update-b")
        stack.kill(stack.extra["update-b"])
    elif kind == "start-update-b":
        down.discard("update-b")
        stack.start_named("update-b", GROUPS["update"], engine=1)
    elif kind == "kill-engine":
        stack.kill(stack.engines[0])
    elif kind == "restart-update-a":
        stack.kill(stack.extra["update-a"])
        stack.start_named("update-a", GROUPS["update"], engine=0)
    else:  # restore what is still down
        cluster.start_node(stack.settings, stack.members[2], stack.members)
        stack.start_engine(0)


_STAMP = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)")


def rebalances(root: Path) -> list[float]:
    """Times (unix s) of the update workers' partition assignments, one per rebalance."""
    stamps = []
    for path in root.glob("worker-update-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "rebalance:" in line and (m := _STAMP.search(line)):
                stamps.append(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")))
    merged: list[float] = []
    for t in sorted(stamps):  # every member logs the same rebalance
        if not merged or t - merged[-1] > 3.0:
            merged.append(t)
    return merged


def audit(s: Settings, train_ids: list[str]) -> dict[str, int]:
    rollouts = {r["event_id"]: r["interaction"]["event_id"] for r in read_ids(s, "rollouts")
                if r.get("kind") == "rollout_generated"}
    updates = {u["event_id"]: u for u in read_ids(s, "updates")
               if u.get("kind") == "policy_updated"}
    letters = read_ids(s, "dead-letters")
    per_step: dict[tuple[str, int], set[str]] = defaultdict(set)
    trained: Counter[str] = Counter()
    for u in updates.values():
        per_step[(u["policy_id"], u["step"])].add(u["event_id"])
        trained.update({rollouts.get(rid, rid) for rid in u["rollout_ids"]})
    lettered = {_letter_origin(d, rollouts) for d in letters}
    steps: dict[str, set[int]] = defaultdict(set)
    for policy, step in per_step:
        steps[policy].add(step)
    index = CatalogIndex(s)
    revision_gaps = 0
    for policy in steps:
        entry = index.get(policy)
        revs = set(entry.revisions) if entry else set()
        revision_gaps += (max(revs) - len(revs)) if revs else 0
    return {
        "lost": sum(1 for i in train_ids if i not in trained and i not in lettered),
        "duplicated": sum(1 for i in train_ids if trained[i] > 1),
        "stale_steps": sum(len(ids) - 1 for ids in per_step.values()),
        "step_gaps": sum(max(st) - len(st) for st in steps.values()),
        "revision_gaps": revision_gaps,
        "dead_lettered": len(letters),
        "steps": len(per_step),
        "revisions": sum(len(e.revisions) for p in steps if (e := index.get(p)) is not None),
    }


def _letter_origin(letter: dict[str, Any], rollouts: dict[str, str]) -> str:
    """The interaction a dead letter stands for (its original event, or what that nests)."""
    import base64

    try:
        raw = orjson.loads(base64.b64decode(letter.get("original_b64") or ""))
    except orjson.JSONDecodeError:
        return ""
    for path in (("rollout", "interaction"), ("interaction",), ()):
        node: Any = raw
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and "event_id" in node:
            return str(rollouts.get(node["event_id"], node["event_id"]))
    return ""


def run(n: int, policies: int, root: Path, timeout_s: float = 3600.0) -> dict[str, Any]:
    stack = ClusterStack(root)
    try:
        stack.start()
        s = stack.settings
        rows, train_ids = _interactions(n, policies)
        log(f"{n} interactions over {policies} policies; brokers {s.bootstrap_servers}")
        for i in (0, 1):
            stack.start_engine(i)
        stack.wait_engines()
        for group, stages in GROUPS.items():
            for j, side in enumerate("ab"):
                stack.start_named(f"{group}-{side}", stages, engine=j)
        producer = Producer(s, rows, topic="interactions")
        held = policies * HELD_OUT
        started = time.monotonic()
        down: set[str] = set()
        faults: list[tuple[str, float]] = []
        restarts = 0
        for share, kind in SCHEDULE:
            while (done := _retrying(lambda: _trained(s))) < int(share * n):
                producer.send_until(min(len(rows), held + done + AHEAD))
                restarts += _supervise(stack, down)
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"training stalled at {done} of {n}")
                time.sleep(1.0)
            log(f"{producer.sent - held} sent, {done} trained: {kind}")
            faults.append((kind, time.time()))
            inject(stack, kind, down)
        producer.send_until(len(rows))
        producer.close()
        while not _retrying(lambda: _drained(s)):
            if time.monotonic() - started > timeout_s:
                raise TimeoutError("the pipeline did not finish")
            restarts += _supervise(stack, down)
            time.sleep(2.0)
        seconds = time.monotonic() - started
        log("drained; auditing")
        result = audit(s, train_ids)
        assigned = rebalances(root)
        return {"brokers": 3, "workers": len(stack.extra), "engines": len(stack.engines),
                "events": n, "policies": policies,
                "faults_injected": sum(1 for k, _ in faults if k in FAULTS),
                "rebalances": len(assigned), **result,
                "resume": _resume(s, faults, assigned), "worker_restarts": restarts,
                "resent_chunks": producer.resent_chunks, "seconds": round(seconds, 1)}
    finally:
        stack.close()


def _resume(s: Settings, faults: list[tuple[str, float]], assigned: list[float]
            ) -> dict[str, dict[str, float | None]]:
    """Per update-worker fault: seconds until the update group had its new assignment, and
    until the first step trained after that assignment."""
    stamps = sorted(u["ts"] for u in read_ids(s, "updates") if u.get("kind") == "policy_updated")
    out: dict[str, dict[str, float | None]] = {}
    for kind, t in faults:
        if "update" not in kind:
            continue
        at = next((a for a in assigned if a >= t - 1.0), None)
        step = next((x for x in stamps if at is not None and x > at), None)
        out[kind] = {"assigned_s": None if at is None else round(at - t, 1),
                     "training_s": None if step is None else round(step - t, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--policies", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorastream-cluster-") as tmp:
        result = run(args.events, args.policies, Path(tmp))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
