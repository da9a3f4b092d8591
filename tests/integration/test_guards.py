"""Training and serving guards on the real broker and Redis.

- A step with a non-finite loss is rejected, its policy is paused with a `PolicyPaused` event on
  `promotions`, later rollouts and updates of that policy are dead-lettered ("policy paused")
  while other policies train on, and `lorastream resume` lifts the pause (worker process).
- A revision that scores worse than the serving one is never promoted, also when a better one
  was promoted after it was evaluated, and also when its verdict is forged.
- Serving is rolled back automatically when the online reward of its rollouts is too low.
- Both serving guards also hold end to end, in promote and reward worker processes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.settings import REPO_ROOT, Settings, settings_env
from schemas.codec import encode_event
from schemas.events import (
    AdapterExported,
    Completion,
    InteractionLogged,
    RolloutGenerated,
    RolloutRewarded,
)
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.stages import evaluate_with, export_step, promote_guarded
from tests.support.waiting import wait_for
from workers.catalog.index import CatalogIndex
from workers.pipeline import guards
from workers.pipeline.context import StageContext
from workers.pipeline.promote import NotBetterError

pytestmark = pytest.mark.run_settings(update_batch=1, export_every=1000)


def _rewarded(policy: str, rewards: list[float], revision: int = 0) -> RolloutRewarded:
    inter = InteractionLogged(policy_id=policy, prompt="q?", task="length",
                              task_params={"target_chars": 0})
    ro = RolloutGenerated(
        policy_id=policy, interaction=inter, revision=revision, prompt_ids=[5, 6, 7],
        completions=[Completion(text="ab", token_ids=[8, 9], logprobs=[-1.0, -1.2]),
                     Completion(text="c", token_ids=[10], logprobs=[-0.5])],
        temperature=1.0)
    return RolloutRewarded(policy_id=policy, rollout=ro, rewards=rewards, reward_fn="length")


@pytest.fixture
def worker(run: Settings, tmp_path: Path) -> Iterator[None]:
    log = tmp_path / "worker.log"
    proc = start_worker(run, "rollout,update", log)
    yield
    stop_process(proc, log)


def _of(run: Settings, topic: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_topic(run, topic, 0.5) if e.get("kind") == kind]


def test_rejected_step_pauses_the_policy_until_resumed(run: Settings, worker: None) -> None:
    exploding = _rewarded("alice", [1e308, -1e308])  # finite, but the advantages are not
    later = [_rewarded("alice", [1.0, 0.0]), _rewarded("bob", [1.0, 0.0])]
    interaction = InteractionLogged(policy_id="alice", prompt="more?", task="length")
    produce_raw(run, "rewards", [(b"alice", encode_event(exploding))])
    paused = wait_for(lambda: _of(run, "promotions", "policy_paused"), 180, interval=0.5,
                      message="a PolicyPaused event")
    assert paused[0]["policy_id"] == "alice" and paused[0]["stage"] == "update"
    assert "non-finite" in paused[0]["reason"]
    produce_raw(run, "rewards", [(e.policy_id.encode(), encode_event(e)) for e in later])
    produce_raw(run, "interactions", [(b"alice", encode_event(interaction))])
    wait_for(lambda: any(u["policy_id"] == "bob" for u in _of(run, "updates", "policy_updated")),
             120, interval=0.5, message="bob trains on while alice is paused")
    letters = wait_for(lambda: len(d := read_topic(run, "dead-letters")) >= 3 and d, 60)
    assert sorted(d["stage"] for d in letters[1:]) == ["rollout", "update"]
    assert all("policy paused" in d["error"] for d in letters[1:])
    assert not any(u["policy_id"] == "alice" for u in _of(run, "updates", "policy_updated"))

    cli = [sys.executable, "-m", "streams.cli", "resume", "alice"]
    env = {**settings_env(run), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    produce_raw(run, "rewards", [(b"alice", encode_event(_rewarded("alice", [0.0, 1.0])))])
    wait_for(lambda: any(u["policy_id"] == "alice" for u in _of(run, "updates", "policy_updated")),
             120, interval=0.5, message="alice trains again after resume")
    assert len(_of(run, "promotions", "policy_paused")) == 1


# -- promotion and rollback (stage functions and guards in-process, real Redis and Kafka) ---------
@pytest.fixture
def ctx(run: Settings) -> Iterator[StageContext]:
    c = StageContext.create(run.model_copy(update={
        "online_rollback_threshold": 0.5, "online_rollback_window": 3}))
    yield c
    c.catalog.close()


def _three_revisions(ctx: StageContext) -> list[AdapterExported]:
    ctx.state.add_heldout(InteractionLogged(policy_id="p", prompt="held?", split="eval"))
    return [export_step(ctx, "p", step) for step in (2, 4, 6)]


def test_worse_than_serving_is_never_promoted(ctx: StageContext) -> None:
    r1, r2, r3 = _three_revisions(ctx)
    scores = {0: 0.2, 1: 0.6, 2: 0.5, 3: 0.4}
    ev1, ev2 = (evaluate_with(ctx, r, scores) for r in (r1, r2))
    assert ev2.passed and ev2.baseline_revision == 0  # evaluated before r1 served
    assert len(promote_guarded(ctx, ev1)) == 1 and ctx.index.serving("p").revision == 1
    with pytest.raises(NotBetterError, match="r1 serves now"):
        promote_guarded(ctx, ev2)  # beat r0 when evaluated, but r1 serves now and is better
    worse = evaluate_with(ctx, r3, scores)
    assert not worse.passed and promote_guarded(ctx, worse) == []
    forged = worse.model_copy(update={"passed": True})
    with pytest.raises(NotBetterError, match="not above serving"):
        promote_guarded(ctx, forged)
    assert ctx.index.serving("p").revision == 1
    entry = CatalogIndex(ctx.settings).get("p")
    assert entry is not None and entry.serving == 1


def test_low_online_reward_rolls_serving_back(ctx: StageContext) -> None:
    r1, r2, _ = _three_revisions(ctx)
    for exported, scores in ((r1, {0: 0.1, 1: 0.5}), (r2, {1: 0.5, 2: 0.9})):
        assert len(promote_guarded(ctx, evaluate_with(ctx, exported, scores))) == 1
    assert ctx.index.serving("p").revision == 2
    good = [_rewarded("p", [0.9, 0.8], revision=2) for _ in range(3)]
    assert guards.observe_rewards(ctx, good) == []
    not_serving = [_rewarded("p", [0.0, 0.0], revision=1) for _ in range(5)]
    assert guards.observe_rewards(ctx, not_serving) == []  # r1 does not serve: ignored
    bad = [_rewarded("p", [0.0, 0.0], revision=2) for _ in range(6)]
    rolled = guards.observe_rewards(ctx, bad)
    assert [(e.from_revision, e.to_revision) for e in rolled] == [(2, 1)]
    assert "online reward" in rolled[0].reason
    assert ctx.index.serving("p").revision == 1 and ctx.index.hot_set() == ["p@1"]
    announced = wait_for(lambda: _of(ctx.settings, "promotions", "policy_rolled_back"), 30)
    assert announced[0]["to_revision"] == 1
    entry = CatalogIndex(ctx.settings).get("p")
    assert entry is not None and entry.serving == 1


def test_serving_guards_hold_in_a_worker_process(ctx: StageContext, tmp_path: Path) -> None:
    """The same two guards end to end: a forged verdict arriving on `evaluations` is refused
    by a promote worker, and poor rollouts of the serving revision arriving on `rollouts` make
    a reward worker roll serving back."""
    r1, r2, r3 = _three_revisions(ctx)
    for exported, scores in ((r1, {0: 0.1, 1: 0.5}), (r2, {1: 0.5, 2: 0.9})):
        assert len(promote_guarded(ctx, evaluate_with(ctx, exported, scores))) == 1
    forged = evaluate_with(ctx, r3, {2: 0.9, 3: 0.2}).model_copy(update={"passed": True})
    inter = InteractionLogged(policy_id="p", prompt="q?", task="length",
                              task_params={"target_chars": 0})
    poor = [RolloutGenerated(  # 40 chars against a target of 0: reward 8/48 < 0.5
        policy_id="p", interaction=inter, revision=2, prompt_ids=[5, 6, 7],
        completions=[Completion(text="x" * 40, token_ids=[8] * 40, logprobs=[-1.0] * 40)] * 2,
        temperature=1.0) for _ in range(3)]
    log = tmp_path / "worker.log"
    proc = start_worker(ctx.settings, "reward,promote", log)
    try:
        produce_raw(ctx.settings, "evaluations", [(b"p", encode_event(forged))])
        letter = wait_for(lambda: read_topic(ctx.settings, "dead-letters"), 120, interval=0.5,
                          message="the forged promotion dead-lettered")
        assert letter[0]["stage"] == "promote" and "not above serving" in letter[0]["error"]
        assert ctx.index.serving("p").revision == 2
        produce_raw(ctx.settings, "rollouts", [(b"p", encode_event(e)) for e in poor])
        rolled = wait_for(lambda: _of(ctx.settings, "promotions", "policy_rolled_back"), 120,
                          interval=0.5, message="serving rolled back by the reward worker")
    finally:
        stop_process(proc, log)
    assert (rolled[0]["from_revision"], rolled[0]["to_revision"]) == (2, 1)
    assert ctx.index.serving("p").revision == 1
    assert _of(ctx.settings, "promotions", "policy_promoted") == []  # the worker promoted none
