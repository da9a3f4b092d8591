"""Guards around the stages: who may enter, when training stops, when serving goes back.

- Admission (`admit`): an event whose policy is paused is refused by the rollout and update
  stages ("policy paused"); with `require_registered_policies` on, the rollout stage refuses a
  policy the catalog does not know ("unknown policy"). A policy id that is not even a valid id is
  a schema violation long before this.
- Pause (`pause`/`resume`): a rejected training step (non-finite loss or gradient, or a pre-clip
  gradient norm above `max_grad_norm_reject`) pauses the policy, so it cannot keep burning
  interactions on a diverged adapter; the first pause publishes a `PolicyPaused` event, a
  resume a `PolicyResumed` (a Redis rebuild replays them: `workers/pipeline/replay.py`).
- Promotion (`check_promotion`): a passed verdict must beat what serves now (a better revision
  may have been promoted since the evaluation), else the promotion is dead-lettered.
- Online rollback (`observe_rewards`): the mean reward of the last `online_rollback_window`
  rollout groups sampled from the serving revision is kept per revision in Redis; when it falls
  below `online_rollback_threshold`, the catalog rolls serving back (once per revision). The
  rollout stage samples from the training head, so this sees the serving revision's rewards
  whenever the head serves.

All state is in Redis under the pipeline's prefix, so every worker process sees the same pause.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from typing import cast

from pydantic import BaseModel

from schemas.errors import PoisonEventError
from schemas.events import (
    AdapterEvaluated,
    Event,
    PolicyPaused,
    PolicyResumed,
    PolicyRolledBack,
    RolloutRewarded,
)
from schemas.ids import derive_id
from workers.catalog.index import CatalogIndex
from workers.pipeline.context import StageContext
from workers.pipeline.state import PolicyState

log = logging.getLogger(__name__)

PAUSABLE_STAGES = ("rollout", "update")
EVENT_CHECKED_STAGES = ("promote",)
"""Stages whose admission also looks at each event (`admit_event`), not just its policy."""


class PolicyPausedError(PoisonEventError):
    """The policy is paused: its events are dead-lettered until it is resumed."""


class NotBetterError(PoisonEventError):
    """A promotion whose revision does not beat the serving one: it never serves."""


class UnknownPolicyError(PoisonEventError):
    """The policy is not registered in the catalog (with `require_registered_policies`)."""


def _paused_key(ctx: StageContext, policy_id: str) -> str:
    return ctx.settings.key("paused", policy_id)


def admit(ctx: StageContext, stage: str, event: Event) -> None:
    """Raise a poison error if this stage must not handle the event's policy now."""
    refused = refusals(ctx, stage, [event.policy_id])[event.policy_id]
    if refused is not None:
        raise refused
    admit_event(ctx, stage, event)


def refusals(ctx: StageContext, stage: str,
             policies: list[str]) -> dict[str, PoisonEventError | None]:
    """For each policy, why this stage must refuse its events now (None: admitted), in one
    Redis round trip for the whole batch: the per-event cost matters at ingest rates."""
    unique = list(dict.fromkeys(policies))
    refused: dict[str, PoisonEventError | None] = dict.fromkeys(unique)
    if stage in PAUSABLE_STAGES and unique:
        pipe = ctx.state.r.pipeline(transaction=False)
        for policy in unique:
            pipe.hget(_paused_key(ctx, policy), "reason")
        for policy, reason in zip(unique, pipe.execute(), strict=True):
            if reason is not None:
                refused[policy] = PolicyPausedError(
                    f"policy paused: {policy!r} ({cast(bytes, reason).decode()})")
    if stage == "rollout" and ctx.settings.require_registered_policies:
        index = CatalogIndex(ctx.settings, ctx.state.r)
        for policy in unique:
            if refused[policy] is None and not index.exists(policy):
                refused[policy] = UnknownPolicyError(
                    f"unknown policy {policy!r}: not registered in the catalog")
    return refused


def admit_event(ctx: StageContext, stage: str, event: Event) -> None:
    """The per-event part of admission: a promotion must beat what serves now."""
    if stage == "promote" and isinstance(event, AdapterEvaluated) and event.passed:
        check_promotion(ctx, event)


def check_promotion(ctx: StageContext, event: AdapterEvaluated) -> None:
    """Refuse a promotion that does not beat what serves *now*.

    The verdict was reached against the revision serving at evaluation time; if another
    revision was promoted since, compare with that one's score on the same held-out set (the
    evaluate stage cached it when it was a candidate), and refuse when it is unknown.
    """
    margin = ctx.settings.promote_margin
    if not event.score > event.baseline_score + margin:
        raise NotBetterError(f"r{event.revision} scored {event.score:.4f}, not above serving "
                             f"r{event.baseline_revision} {event.baseline_score:.4f} + {margin}")
    serving = ctx.state.serving(event.policy_id).revision
    if serving in (event.baseline_revision, event.revision) or event.revision < serving:
        return  # compared with what serves; an older revision is skipped by the stage itself
    heldout = ctx.state.heldout(event.policy_id)
    fingerprint = hashlib.sha256("".join(h.event_id for h in heldout).encode()).hexdigest()[:12]
    current = ctx.state.cached_score(event.policy_id, f"{serving}:{fingerprint}")
    if current is None or not event.score > current + margin:
        raise NotBetterError(f"r{event.revision} ({event.score:.4f}) was evaluated against "
                             f"r{event.baseline_revision}, but r{serving} serves now "
                             f"({current if current is not None else 'score unknown'})")


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


def resume(ctx: StageContext, policy_id: str) -> PolicyResumed | None:
    """Lift a pause (operator action); the event to publish, or None if it was not paused."""
    key = _paused_key(ctx, policy_id)
    reason = cast("bytes | None", ctx.state.r.hget(key, "reason"))
    if not ctx.state.r.delete(key):
        return None
    return PolicyResumed(event_id=derive_id("resume", policy_id, time.time_ns()),
                         policy_id=policy_id,
                         paused_reason=reason.decode() if reason is not None else None)


def restore_pause(state: PolicyState, event: PolicyPaused | PolicyResumed) -> None:
    """Make Redis say what a replayed pause or resume event says (a rebuild after a flush)."""
    key = state.settings.key("paused", event.policy_id)
    if isinstance(event, PolicyResumed):
        state.r.delete(key)
        return
    state.r.hset(key, mapping={"reason": event.reason[:500], "stage": event.stage,
                               "ts": event.ts})


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
    key, window = _reward_key(ctx, policy, revision), ctx.settings.online_rollback_window
    # The reward stage's seen-marks drop redelivered rollouts before they get here, so a
    # redelivery is not counted twice.
    pipe = ctx.state.r.pipeline(transaction=True)
    pipe.lpush(key, sum(event.rewards) / len(event.rewards))
    pipe.ltrim(key, 0, window - 1)
    pipe.lrange(key, 0, -1)
    recent = [float(x) for x in pipe.execute()[-1]]
    mean = sum(recent) / len(recent)
    if len(recent) < window or mean >= threshold:
        return None
    if not ctx.state.r.set(f"{key}:rolled_back", 1, nx=True):
        return None  # another worker already rolled this revision back
    n = len(recent)
    reason = (f"online reward {mean:.4f} over the last {n} groups below "
              f"{threshold} for r{revision}")
    log.warning("rolling back %s: %s", policy, reason)
    return ctx.catalog.rollback(policy, reason=f"automatic: {reason}")


def paused_policies(ctx: StageContext) -> list[dict[str, str]]:
    """Every paused policy with the stage and reason that paused it."""
    prefix = ctx.settings.key("paused", "")
    rows = []
    for key in ctx.state.r.scan_iter(match=prefix + "*", count=1000):
        raw = cast("dict[bytes, bytes]", ctx.state.r.hgetall(key))
        rows.append({"policy_id": key.decode()[len(prefix):],
                     "stage": raw.get(b"stage", b"").decode(),
                     "reason": raw.get(b"reason", b"").decode()})
    return sorted(rows, key=lambda r: r["policy_id"])
