"""Effects happen once: replaying every topic to a second worker, and re-producing the same
interactions, creates no new rollouts, rewards, steps or revisions (real broker, real Redis).

The second worker joins as a new consumer group (what a reset of the group's offsets to the
earliest, or a rebalance onto a consumer that never committed, looks like): it is redelivered
every event the first worker handled. Derived event ids and the stages' seen-marks in Redis
must turn all of them into no-ops.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import InteractionLogged
from streams.app import group_id
from tests.support.kafka import drained, produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.waiting import wait_for
from workers.catalog.index import CatalogIndex

pytestmark = pytest.mark.run_settings(group_size=2, max_new_tokens=4, update_batch=1,
                                      export_every=2)

STAGES = "rollout,reward,update,export"
STAGE_LIST = STAGES.split(",")
TOPICS = ["rollouts", "rewards", "updates", "exports"]


def _snapshot(run: Settings) -> dict[str, Counter[str]]:
    return {t: Counter(e["event_id"] for e in read_topic(run, t, 0.5)) for t in TOPICS}


def test_replaying_every_topic_creates_no_duplicate_effects(run: Settings,
                                                            tmp_path: Path) -> None:
    interactions = [InteractionLogged(policy_id="alice", prompt=f"q{i}?", task="length",
                                      task_params={"target_chars": 0}) for i in range(4)]
    raw = [(b"alice", encode_event(e)) for e in interactions]
    produce_raw(run, "interactions", raw)
    log = tmp_path / "worker.log"
    first = start_worker(run, STAGES, log)
    try:
        wait_for(lambda: len(read_topic(run, "exports", 0.5)) >= 2, 240, interval=0.5,
                 message="two revisions exported")
        wait_for(lambda: drained(run, group_id(run, STAGE_LIST), ["interactions", *TOPICS[:3]]),
                 60, interval=0.5, message="first worker committed everything")
    finally:
        stop_process(first, log)
    before = _snapshot(run)
    assert all(n == 1 for c in before.values() for n in c.values()), before
    assert [len(before[t]) for t in TOPICS] == [4, 4, 4, 2]

    produce_raw(run, "interactions", raw)  # a producer retrying the whole batch
    replay = run.model_copy(update={"app_id": f"{run.app_id}-replay"})
    second = start_worker(replay, STAGES, log)
    try:
        wait_for(lambda: drained(replay, group_id(replay, STAGE_LIST),
                                 ["interactions", *TOPICS[:3]]),
                 240, interval=0.5, message="second worker consumed every topic from the start")
    finally:
        stop_process(second, log)

    assert _snapshot(run) == before
    updates = read_topic(run, "updates", 0.5)
    assert sorted(u["step"] for u in updates) == [1, 2, 3, 4]
    exports = read_topic(run, "exports", 0.5)
    assert sorted(e["revision"] for e in exports) == [1, 2]
    entry = CatalogIndex(run).get("alice")
    assert entry is not None and sorted(entry.revisions) == [1, 2]
