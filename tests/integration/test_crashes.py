"""Crash safety on the real broker and Redis: a worker process is killed (exit 137, as SIGKILL,
at a named point: `workers/pipeline/faults.py`) during an export or a gradient update, and
restarted.

Audit afterwards: every interaction is in exactly one trainer step (or dead-lettered), step
and revision numbers have no gaps or duplicates, the catalog agrees with the topic, and the
artifact store holds only complete adapters whose bytes hash to their address (a half-written
adapter is never visible, so it can never be served).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import InteractionLogged
from streams.app import group_id
from tests.support.kafka import drained, produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.waiting import wait_for
from workers.artifacts.store import ArtifactStore
from workers.catalog.index import CatalogIndex

pytestmark = pytest.mark.run_settings(group_size=2, max_new_tokens=4, update_batch=1,
                                      export_every=2)

TRAIN, EXPORT = "rollout,reward,update", "export"
N = 6  # interactions = trainer steps (one group per step); export every 2 -> 3 revisions


def _unique(run: Settings, topic: str, kind: str) -> list[dict[str, Any]]:
    """Events by id: a re-sent event (same id) is one effect, downstream drops the copy."""
    by_id = {e["event_id"]: e for e in read_topic(run, topic, 0.5) if e.get("kind") == kind}
    return list(by_id.values())


def audit(run: Settings, interactions: list[InteractionLogged]) -> None:
    """The exactly-once, gapless, no-half-written-artifact checks every crash test ends with."""
    rollouts = _unique(run, "rollouts", "rollout_generated")
    origin = {r["event_id"]: r["interaction"]["event_id"] for r in rollouts}
    updates = _unique(run, "updates", "policy_updated")
    assert sorted(u["step"] for u in updates) == list(range(1, N + 1)), "gapless steps"
    trained = Counter(origin[rid] for u in updates for rid in u["rollout_ids"])
    letters = [d for d in read_topic(run, "dead-letters", 0.5)]
    assert letters == []
    assert trained == Counter({i.event_id: 1 for i in interactions}), "each in one step"
    exports = _unique(run, "exports", "adapter_exported")
    assert sorted(e["revision"] for e in exports) == list(range(1, N // 2 + 1)), "gapless revs"
    assert sorted(e["step"] for e in exports) == list(range(2, N + 1, 2))
    entry = CatalogIndex(run).get("alice")
    assert entry is not None and sorted(entry.revisions) == list(range(1, N // 2 + 1))
    assert {n: r.sha256 for n, r in entry.revisions.items()} == {
        e["revision"]: e["sha256"] for e in exports}
    store = ArtifactStore(run.artifacts)
    visible = sorted(p.name for p in store.adapters.iterdir())
    assert visible == sorted({e["sha256"] for e in exports}), "only complete revisions"
    assert all(store.verify(sha) for sha in visible)


def _finished(run: Settings) -> bool:
    """Every reward consumed by the trainer and every update by the exporter: nothing is in
    flight (offsets are committed only after an event is handled)."""
    if len(read_topic(run, "rewards", 0.3)) < N:
        return False
    return (drained(run, group_id(run, TRAIN.split(",")), ["interactions", "rollouts", "rewards"])
            and drained(run, group_id(run, [EXPORT]), ["updates"]))


def crash_and_restart(run: Settings, tmp_path: Path, point: str) -> list[InteractionLogged]:
    """Train in one worker process and export in another; kill the one `point` is in (at that
    point), restart it without the fault, and wait for the pipeline to finish."""
    interactions = [InteractionLogged(policy_id="alice", prompt=f"q{i}?", task="length",
                                      task_params={"target_chars": 0}) for i in range(N)]
    produce_raw(run, "interactions", [(b"alice", encode_event(e)) for e in interactions])
    doomed_stages = EXPORT if point.split(":")[0] in ("export", "artifact") else TRAIN
    other_stages = TRAIN if doomed_stages == EXPORT else EXPORT
    log, other_log = tmp_path / "doomed.log", tmp_path / "other.log"
    other = start_worker(run, other_stages, other_log)
    try:
        doomed = start_worker(run.model_copy(update={"fault_point": point}), doomed_stages, log)
        try:
            assert doomed.wait(240) == 137, f"the worker did not die at {point}"
        finally:
            stop_process(doomed, log)
        restarted = start_worker(run, doomed_stages, log)
        try:
            wait_for(lambda: _finished(run), 300, interval=0.5,
                     message="both workers consumed everything after the restart")
        finally:
            stop_process(restarted, log)
    finally:
        stop_process(other, other_log)
    return interactions


@pytest.mark.parametrize("point", [
    "artifact:before_rename#1",  # adapter files written to tmp, not renamed into the store
    "export:after_fn#1",  # revision numbered and recorded, AdapterExported not sent
    "export:before_mark_seen#2",  # AdapterExported sent, update not marked handled
])
def test_kill_during_export(run: Settings, tmp_path: Path, point: str) -> None:
    interactions = crash_and_restart(run, tmp_path, point)
    audit(run, interactions)


@pytest.mark.parametrize("point", [
    "update:after_fn#1",  # stepped in memory, nothing sent or checkpointed
    "update:after_fn#3",  # after a checkpoint: resumes from it
    "update:before_mark_seen#3",  # PolicyUpdated sent, rewards not marked handled
])
def test_kill_during_update(run: Settings, tmp_path: Path, point: str) -> None:
    interactions = crash_and_restart(run, tmp_path, point)
    audit(run, interactions)


@pytest.mark.parametrize("point", [
    "update:after_fn#2",  # the step's checkpoint and journal are durable, nothing was sent
    "update:before_mark_seen#2",
])
def test_kill_after_a_checkpointed_step(run: Settings, tmp_path: Path, point: str) -> None:
    """The restarted trainer answers the redelivered groups from the step journal instead of
    training them again on top of the checkpoint that already holds them."""
    interactions = crash_and_restart(run, tmp_path, point)
    audit(run, interactions)
