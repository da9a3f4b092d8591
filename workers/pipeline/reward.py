"""The reward stage: `rollouts` → `rewards`, every completion scored by the reward its policy
configures, else the one its interaction's `task` names (`workers/rewards/registry.py`).

A batch off the stream is one unit, scored concurrently and never on the event loop's time:
built-ins inline (microseconds), synchronous plugins in a thread, HTTP judges as coroutines
with many calls in flight (`workers/rewards/http.py`), so a slow judge costs latency, not
heartbeats or commits, and its throughput is the groups in flight over its latency. Outputs are
confirmed per batch. Logged sft targets and dpo pairs are not scored: their rewards are the
labels they came with (`target`, `preference`). Once sent, the rewards of rollouts sampled from
the serving revision feed the online rollback (`workers.pipeline.guards.observe_rewards`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pydantic import BaseModel

from schemas.errors import EventFailures
from schemas.events import RolloutGenerated, RolloutRewarded
from schemas.ids import derive_id
from workers.pipeline.context import StageContext
from workers.pipeline.guards import observe_rewards
from workers.pipeline.inflight import FreedWhenLost
from workers.pipeline.stage import Delivery, Stage
from workers.pipeline.units import WholeBatch

LABELS: dict[str, tuple[str, int]] = {"sft": ("target", 1), "dpo": ("preference", 1)}
"""What labels a logged group's rewards: sft targets 1 each, dpo pairs 1 (chosen), 0."""


def reward(ctx: StageContext, event: RolloutGenerated) -> list[BaseModel]:
    """Score one rollout group (the one-event form of `reward_many`, for synchronous callers
    without a running event loop)."""
    return asyncio.run(reward_many(ctx, [event]))


async def reward_many(ctx: StageContext, events: Sequence[RolloutGenerated]) -> list[BaseModel]:
    """Score a unit of rollout groups concurrently; one `RolloutRewarded` per group, in order.

    Failures are per group (an unknown reward, a function's poison, a judge that stayed down
    through its retries: retryable), raised as `EventFailures` with the others' rewards; a lone
    failure is raised as is. A failure is never a zero reward.
    """
    configs = ctx.configs.get_many([e.policy_id for e in events])
    sampled = [e for e in events if e.objective == "grpo"]
    names = [configs[e.policy_id].reward_for(e.interaction) for e in sampled]
    scored = await ctx.rewards.score_many(
        [(n, e.interaction, [c.text for c in e.completions]) for n, e in
         zip(names, sampled, strict=True)])
    results = {e.event_id: (n, r) for e, n, r in zip(sampled, names, scored, strict=True)}
    outputs: list[BaseModel] = []
    failures: dict[str, Exception] = {}
    for event in events:
        if event.objective in LABELS:
            name, version = LABELS[event.objective]
            rewards = [1.0] if event.objective == "sft" else [1.0, 0.0]
            outputs.append(_rewarded(event, rewards[:len(event.completions)], name, version))
            continue
        name, result = results[event.event_id]
        if isinstance(result, Exception):
            failures[event.event_id] = result
            continue
        outputs.append(_rewarded(event, result, name, ctx.rewards.get(name).version))
    if failures and len(events) == 1:
        raise next(iter(failures.values()))
    if failures:
        raise EventFailures(outputs, failures)
    return outputs


def _rewarded(event: RolloutGenerated, rewards: list[float], name: str,
              version: int) -> RolloutRewarded:
    return RolloutRewarded(event_id=derive_id("reward", event.event_id),
                           policy_id=event.policy_id, rollout=event, rewards=rewards,
                           reward_fn=name, reward_version=version)


def watch_serving(ctx: StageContext, outputs: list[BaseModel]) -> None:
    """Online rollback, only when it is configured (it costs Redis round trips); logged data
    says nothing about what serves."""
    if ctx.settings.online_rollback_threshold is not None:
        observe_rewards(ctx, [o for o in outputs if not isinstance(o, RolloutRewarded)
                              or o.rollout.objective == "grpo"])


STAGE = Stage(
    name="reward", reads="rollouts", event=RolloutGenerated, handle=reward_many,
    writes="rewards", units=WholeBatch(scale=4), slots=FreedWhenLost(), delivery=Delivery.PER_BATCH,
    on_loop=True, observe=watch_serving,
)
