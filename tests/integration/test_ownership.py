"""Training state with several update workers (two stage contexts in one test = two workers:
each its own trainer, sharing Redis and the artifact store as workers on one cluster do):
a policy stepped elsewhere is reloaded before its next step here, a step computed from a state
that another worker advanced meanwhile is fenced off and redone on top of the newest step,
a reassignment drops the policies owned elsewhere, and idle policies leave memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from schemas.events import (
    Completion,
    InteractionLogged,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
)
from workers.pipeline import ownership
from workers.pipeline.context import StageContext
from workers.pipeline.journal import journal_of, step_of
from workers.pipeline.update import update


def _rewarded(policy: str, i: int) -> RolloutRewarded:
    inter = InteractionLogged(policy_id=policy, prompt=f"q {i}?", task="length")
    rollout = RolloutGenerated(
        policy_id=policy, interaction=inter, revision=0, prompt_ids=[1, 6 + i % 50],
        completions=[Completion(text="x" * n, token_ids=[5 + k for k in range(n)],
                                logprobs=[-1.0] * n) for n in (1, 3)],
        temperature=1.0)
    return RolloutRewarded(policy_id=policy, rollout=rollout, rewards=[1.0, 0.0],
                           reward_fn="length")


@pytest.fixture
def run(settings: Settings, tiny_model_dir: Path) -> Settings:
    return settings.model_copy(update={"base_model": tiny_model_dir, "export_every": 2})


def _steps(outputs: list[Any]) -> list[tuple[str, int]]:
    return sorted((o.policy_id, o.step) for o in outputs if isinstance(o, PolicyUpdated))


def test_a_policy_stepped_elsewhere_is_reloaded_before_its_next_step(run: Settings) -> None:
    a, b = StageContext.create(run), StageContext.create(run)
    assert _steps(update(a, [_rewarded("p", 0)])) == [("p", 1)]
    assert _steps(update(b, [_rewarded("p", 1)])) == [("p", 2)]  # b restored step 1
    assert _steps(update(a, [_rewarded("p", 2)])) == [("p", 3)]  # not a second step 2
    assert ownership.residency(a.trainer).stale == 1
    assert a.trainer.steps_done("p") == 3 and step_of(journal_of(a).head("p")) == 3


def test_a_step_overtaken_by_another_worker_is_fenced_and_redone(run: Settings) -> None:
    a, b = StageContext.create(run), StageContext.create(run)
    update(a, [_rewarded("p", 0)])
    update(b, [_rewarded("p", 1)])  # b at step 2
    update(a, [_rewarded("p", 2)])  # a at step 3 (reloaded)
    stepping = a.trainer.step_many
    overtaken: list[tuple[str, int]] = []

    def b_commits_first(batches: dict[str, Any]) -> Any:
        if not overtaken:  # while a computes step 4 from 3, b commits its own step 4
            overtaken.extend(_steps(update(b, [_rewarded("p", 3)])))
        return stepping(batches)

    a.trainer.step_many = b_commits_first  # type: ignore[method-assign]
    mine = _rewarded("p", 4)
    out = update(a, [mine])
    assert overtaken == [("p", 4)]
    assert _steps(out) == [("p", 5)]  # a's step was refused, then trained on top of b's 4
    entry = journal_of(a).latest("p")
    assert entry is not None and entry.step == 5
    assert entry.event_ids == {mine.event_id}
    staged = sorted(p.name for p in (a.store.staging / "p").iterdir())
    assert [n.split("-")[0] for n in staged] == ["2", "4"]  # the fenced step's file is gone


def test_reassignment_and_idleness_bound_what_a_trainer_holds(run: Settings) -> None:
    small = run.model_copy(update={"trainer_max_policies": 3, "partitions": 2})
    a = StageContext.create(small)
    policies = [f"u{i}" for i in range(6)]
    update(a, [_rewarded(p, i) for i, p in enumerate(policies[:3])])
    assert sorted(a.trainer.policies()) == policies[:3]
    update(a, [_rewarded(p, 10 + i) for i, p in enumerate(policies[3:5])])
    assert len(a.trainer.policies()) == 3  # the least recently stepped left memory
    assert ownership.residency(a.trainer).evicted == 2
    again = update(a, [_rewarded("u0", 20)])  # evicted: restored from its journal head
    assert _steps(again) == [("u0", 2)]

    mine = {ownership.partition_of(p, 2) for p in a.trainer.policies()}
    keep = next(iter(mine))
    ownership.assigned(a, {keep})
    assert a.trainer.policies() and all(
        ownership.partition_of(p, 2) == keep for p in a.trainer.policies())

    ownership.stepped(a, [], now=10**9)  # far in the future: everything is idle
    assert a.trainer.policies() == []


async def test_faust_assignments_reach_the_update_stage(run: Settings) -> None:
    """The worker's app connects the stage's hook to Faust's `on_partitions_assigned`."""
    from faust.types import TP

    from streams.app import create_app

    a = StageContext.create(run.model_copy(update={"partitions": 2}))
    policies = [f"v{i}" for i in range(6)]
    update(a, [_rewarded(p, i) for i, p in enumerate(policies)])
    app = create_app(a.settings, ["update"], ctx=a)
    keep = ownership.partition_of("v0", 2)
    await app.on_partitions_revoked.send(set())
    await app.on_partitions_assigned.send({TP(a.settings.topic("rewards"), keep),
                                           TP(a.settings.topic("rollouts"), 1 - keep)})
    held = a.trainer.policies()
    assert "v0" in held and sorted(held) == sorted(
        p for p in policies if ownership.partition_of(p, 2) == keep)
