"""The reward stage: `rollouts` → `rewards`, every completion scored by the reward function
the interaction's task names.

Scoring is microseconds of pure Python, so it runs on the event loop and its outputs are
confirmed per batch. Once sent, the rewards of rollouts sampled from the serving revision feed
the online rollback (`workers.pipeline.guards.observe_rewards`).
"""

from __future__ import annotations

from pydantic import BaseModel

from schemas.events import RolloutGenerated, RolloutRewarded
from schemas.ids import derive_id
from workers.pipeline.context import StageContext
from workers.pipeline.guards import observe_rewards
from workers.pipeline.inflight import FreedWhenLost
from workers.pipeline.stage import Delivery, Stage, single
from workers.rewards.functions import score_completions


def reward(ctx: StageContext, event: RolloutGenerated) -> list[BaseModel]:
    """Score every completion with the reward function the interaction's task names."""
    texts = [c.text for c in event.completions]
    rewards, name, version = score_completions(event.interaction, texts)
    return [
        RolloutRewarded(
            event_id=derive_id("reward", event.event_id),
            policy_id=event.policy_id,
            rollout=event,
            rewards=rewards,
            reward_fn=name,
            reward_version=version,
        )
    ]


def watch_serving(ctx: StageContext, outputs: list[BaseModel]) -> None:
    """Online rollback, only when it is configured (it costs Redis round trips)."""
    if ctx.settings.online_rollback_threshold is not None:
        observe_rewards(ctx, outputs)


STAGE = Stage(
    name="reward", reads="rollouts", event=RolloutGenerated, handle=single(reward),
    writes="rewards", slots=FreedWhenLost(), delivery=Delivery.PER_BATCH, on_loop=True,
    observe=watch_serving,
)
