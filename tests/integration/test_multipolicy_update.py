"""The update stage trains several policies in ONE multi-policy step, and fails per policy.

Real Redis and the real tiny model; the runner's sink and dead letters are in-memory Faust
channels (as in test_agents), so the test sees exactly what the update agent sends.
"""

from __future__ import annotations

import asyncio

import pytest

from infra.settings import Settings
from schemas import DeadLetter, InteractionLogged, PolicyUpdated, RolloutGenerated, decode_event
from schemas.codec import encode_event
from schemas.errors import PoisonEventError, PolicyFailures
from schemas.events import Completion, RolloutRewarded
from streams.runner.runner import Received
from tests.support.stages import all_of, in_process_stage
from workers.pipeline.context import StageContext
from workers.pipeline.update import update
from workers.training.grpo import TrainGroup
from workers.training.multitrainer import StepOutcome

pytestmark = pytest.mark.run_settings(export_every=1, update_batch=2)

BAD_TOKEN = 10**6


def _rewarded(policy: str, i: int, token: int = 5) -> RolloutRewarded:
    inter = InteractionLogged(policy_id=policy, prompt=f"q {i}?", task="length",
                              task_params={"target_chars": 0})
    rollout = RolloutGenerated(
        policy_id=policy, interaction=inter, revision=0, prompt_ids=[1, 6 + i],
        completions=[Completion(text="x" * n, token_ids=[token + k for k in range(n)],
                                logprobs=[-1.0] * n) for n in (1, 3, 5)],
        temperature=1.0,
    )
    return RolloutRewarded(policy_id=policy, rollout=rollout, rewards=[1.0, 0.5, 0.0],
                           reward_fn="length")


@pytest.fixture
def ctx(run: Settings) -> StageContext:
    return StageContext.create(run)


def _count_passes(ctx: StageContext, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record each step_many call's policies (the trainer is real; only observed)."""
    trainer, calls = ctx.trainer, []
    original = trainer.step_many

    def spy(batches: dict[str, list[TrainGroup]]) -> dict[str, StepOutcome]:
        calls.append(sorted(batches))
        return original(batches)

    monkeypatch.setattr(trainer, "step_many", spy)
    return calls


def test_update_steps_many_policies_in_one_call(ctx: StageContext,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_passes(ctx, monkeypatch)
    events = [_rewarded("a", 0), _rewarded("b", 1), _rewarded("a", 2), _rewarded("c", 3)]
    outputs = all_of(PolicyUpdated, update(ctx, events))
    assert calls == [["a", "b", "c"]]
    assert [(o.policy_id, o.step) for o in outputs] == [("a", 1), ("b", 1), ("c", 1)]
    a = next(o for o in outputs if o.policy_id == "a")
    assert a.rollout_ids == [events[0].rollout.event_id, events[2].rollout.event_id]
    assert a.checkpoint is not None and ctx.state.checkpoint_step("a") == 1


def test_a_failing_policy_does_not_cost_the_others_their_step(ctx: StageContext) -> None:
    with pytest.raises(PolicyFailures) as info:
        update(ctx, [_rewarded("a", 0), _rewarded("bad", 1, token=BAD_TOKEN)])
    assert [o.policy_id for o in all_of(PolicyUpdated, info.value.outputs)] == ["a"]
    assert isinstance(info.value.failures["bad"], PoisonEventError)
    assert ctx.trainer.steps_done("a") == 1
    with pytest.raises(PoisonEventError):  # alone: the policy's own error, as before
        update(ctx, [_rewarded("bad", 2, token=BAD_TOKEN)])


async def test_runner_sends_good_policies_and_dead_letters_only_the_bad(
    ctx: StageContext, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, runner = in_process_stage(ctx.settings, "update")
    runner.ctx = ctx
    sink, dlq = runner.sink.__aiter__(), runner.dead_letters.__aiter__()
    calls = _count_passes(ctx, monkeypatch)
    events = [_rewarded("a", 0), _rewarded("a", 1), _rewarded("a", 2),
              _rewarded("bad", 3, token=BAD_TOKEN), _rewarded("b", 4)]
    raws = [encode_event(e) for e in events]
    async with agent.test_context():  # the app's loop and channels, as test_agents uses
        sent = await asyncio.wait_for(runner.process_many(
            [Received(raw, "rewards", 0, i) for i, raw in enumerate(raws)]), 60)
    # update_batch=2: round 1 trains a (2 groups), bad, b together; round 2 trains a's third
    assert calls == [["a", "b", "bad"], ["a"]]
    assert [(o.policy_id, o.step) for o in all_of(PolicyUpdated, sent)] == [
        ("a", 1), ("b", 1), ("a", 2)]
    got = [decode_event(PolicyUpdated, (await sink.get(timeout=10)).value) for _ in sent]
    assert [o.policy_id for o in got] == ["a", "b", "a"]
    letter = DeadLetter.model_validate_json((await dlq.get(timeout=10)).value)
    assert (letter.policy_id, letter.offset, letter.stage) == ("bad", 3, "update")
    assert dlq.empty()
    assert await runner.process_many([Received(raws[4], "rewards", 0, 4)]) == []  # seen
