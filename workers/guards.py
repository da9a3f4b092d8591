"""Guards around the stages: who may enter, when training stops, when serving goes back.

- Admission (`admit`): an event whose policy is paused is refused by the rollout and update
  stages ("policy paused"); with `require_registered_policies` on, the rollout stage refuses a
  policy the catalog does not know ("unknown policy"). A policy id that is not even a valid id is
  a schema violation long before this.
- Pause (`pause`/`resume`): a rejected training step (non-finite loss or gradient, or a pre-clip
  gradient norm above `max_grad_norm_reject`) pauses the policy, so it cannot keep burning
  interactions on a diverged adapter; the first pause publishes a `PolicyPaused` event.
- Online rollback (`observe_rewards`): the mean reward of rollouts sampled from the serving
  revision is tracked per revision in Redis; once `online_rollback_min_samples` groups are in
  and the mean is below `online_rollback_threshold`, the catalog rolls serving back.

All state is in Redis under the pipeline's prefix, so every worker process sees the same pause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from pydantic import BaseModel

from schemas.events import Event, PolicyPaused, PolicyRolledBack, RolloutRewarded
from workers.catalog_index import CatalogIndex
from workers.context import StageContext
from workers.errors import PoisonEventError
from workers.ids import derive_id

log = logging.getLogger(__name__)

PAUSABLE_STAGES = ("rollout", "update")


class PolicyPausedError(PoisonEventError):
    """The policy is paused: its events are dead-lettered until it is resumed."""


class UnknownPolicyError(PoisonEventError):
    """The policy is not registered in the catalog (with `require_registered_policies`)."""


def _paused_key(ctx: StageContext, policy_id: str) -> str:
    return ctx.settings.key("paused", policy_id)


def is_paused(ctx: StageContext, policy_id: str) -> bool:
    return bool(ctx.state.r.exists(_paused_key(ctx, policy_id)))


def paused_reason(ctx: StageContext, policy_id: str) -> str | None:
    raw = ctx.state.r.hget(_paused_key(ctx, policy_id), "reason")
    return raw.decode() if raw is not None else None


def admit(ctx: StageContext, stage: str, event: Event) -> None:
    """Raise a poison error if this stage must not handle the event's policy now."""
    policy = event.policy_id
    if stage in PAUSABLE_STAGES and is_paused(ctx, policy):
        raise PolicyPausedError(f"policy paused: {policy!r} ({paused_reason(ctx, policy)})")
    if (stage == "rollout" and ctx.settings.require_registered_policies
            and not CatalogIndex(ctx.settings, ctx.state.r).exists(policy)):
        raise UnknownPolicyError(f"unknown policy {policy!r}: not registered in the catalog")


def pause(ctx: StageContext, policy_id: str, stage: str, reason: str) -> PolicyPaused | None:
    """Mark the policy paused; returns the event to publish the first time only (else None)."""
    key = _paused_key(ctx, policy_id)
    first = ctx.state.r.hsetnx(key, "reason", reason[:500])
    if not first:
        return None
    ctx.state.r.hset(key, mapping={"stage": stage, "ts": time.time()})
    log.warning("pausing policy %s: %s", policy_id, reason)
    return PolicyPaused(event_id=derive_id("pause", policy_id, time.time_ns()),
                        policy_id=policy_id, stage=stage, reason=reason[:500])


def resume(ctx: StageContext, policy_id: str) -> bool:
    """Lift a pause (operator action); True if the policy was paused."""
    return bool(ctx.state.r.delete(_paused_key(ctx, policy_id)))


# -- online rollback ---------------------------------------------------------------------------
def _reward_key(ctx: StageContext, policy_id: str, revision: int) -> str:
    return ctx.settings.key("online", policy_id, revision)


def observe_rewards(ctx: StageContext, outputs: Iterable[BaseModel]) -> list[PolicyRolledBack]:
    """Track rewards of rollouts sampled from the serving revision; roll back when too low."""
    threshold = ctx.settings.online_rollback_threshold
    if threshold is None:
        return []
    done: list[PolicyRolledBack] = []
    for out in outputs:
        if not isinstance(out, RolloutRewarded) or not out.rewards:
            continue
        rolled = _observe_one(ctx, out, threshold)
        if rolled is not None:
            done.append(rolled)
    return done


def _observe_one(ctx: StageContext, event: RolloutRewarded,
                 threshold: float) -> PolicyRolledBack | None:
    policy, revision = event.policy_id, event.rollout.revision
    if revision == 0 or ctx.state.serving(policy).revision != revision:
        return None  # only the serving revision's online reward decides about serving
    key = _reward_key(ctx, policy, revision)
    # One HINCRBYFLOAT per group keyed by event id would double count a redelivery; the seen
    # mark of the reward stage already drops redelivered rollouts before they get here.
    pipe = ctx.state.r.pipeline(transaction=True)
    pipe.hincrby(key, "n", 1)
    pipe.hincrbyfloat(key, "sum", sum(event.rewards) / len(event.rewards))
    n, total = pipe.execute()
    mean = float(total) / int(n)
    if int(n) < ctx.settings.online_rollback_min_samples or mean >= threshold:
        return None
    if not ctx.state.r.hsetnx(key, "rolled_back", 1):
        return None  # another worker already rolled this revision back
    reason = (f"online reward {mean:.4f} over {int(n)} groups below "
              f"{threshold} for r{revision}")
    log.warning("rolling back %s: %s", policy, reason)
    return ctx.catalog.rollback(policy, reason=f"automatic: {reason}")
