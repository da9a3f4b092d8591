"""Guards around the stages: who may enter, when training stops, when serving goes back.

- Admission (`Admission`): a stage lists the checks its policies must pass. The rollout and
  update stages refuse a paused policy ("policy paused"); with `require_registered_policies`
  on, the rollout stage refuses a policy the catalog does not know ("unknown policy"). A policy
  id that is not even a valid id is a schema violation long before this.
- Pause (`pause`/`resume`): a rejected training step (non-finite loss or gradient, or a pre-clip
  gradient norm above `max_grad_norm_reject`) pauses the policy, so it cannot keep burning
  interactions on a diverged adapter; the first pause publishes a `PolicyPaused` event, a
  resume a `PolicyResumed` (a Redis rebuild replays them: `workers/pipeline/replay.py`).
- Online rollback (`observe_rewards`): the mean reward of the last `online_rollback_window`
  rollout groups sampled from the serving revision is kept per revision in Redis; when it falls
  below `online_rollback_threshold`, the catalog rolls serving back (once per revision). The
  rollout stage samples from the training head, so this sees the serving revision's rewards
  whenever the head serves. Production feedback is the other signal of the same design
  (`workers/catalog/online.py`, fed by the gateway): same windows, same once-per-revision
  rollback.

Whether a revision may be promoted is decided in one place, `workers/pipeline/promote.py`. All
state is in Redis under the pipeline's prefix, so every worker process sees the same pause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from pydantic import BaseModel

from schemas.errors import PoisonEventError
from schemas.events import PolicyPaused, PolicyResumed, PolicyRolledBack, RolloutRewarded
from schemas.ids import derive_id
from workers.catalog.online import push_window, rollback_once
from workers.pipeline.context import StageContext
from workers.pipeline.state import PolicyState

log = logging.getLogger(__name__)

PolicyCheck = Callable[[StageContext, list[str]], dict[str, PoisonEventError]]
"""Why some of `policies` must be refused now (absent: admitted), for a whole batch at once."""


class PolicyPausedError(PoisonEventError):
    """The policy is paused: its events are dead-lettered until it is resumed."""


class UnknownPolicyError(PoisonEventError):
    """The policy is not registered in the catalog (with `require_registered_policies`)."""


@dataclass(frozen=True)
class Admission:
    """The checks a stage's policies must pass; none means every policy is admitted."""

    checks: tuple[PolicyCheck, ...] = ()

    def refusals(self, ctx: StageContext,
                 policies: list[str]) -> dict[str, PoisonEventError | None]:
        """For each policy, why it is refused (None: admitted); the first failing check wins.
        One round trip per check for the whole batch: the per-event cost matters at ingest."""
        refused: dict[str, PoisonEventError | None] = dict.fromkeys(policies)
        for check in self.checks:
            pending = [p for p in policies if refused[p] is None]
            if pending:
                refused.update(check(ctx, pending))
        return refused


def refuse_paused(ctx: StageContext, policies: list[str]) -> dict[str, PoisonEventError]:
    reasons = ctx.state.paused_reasons(policies)
    return {policy: PolicyPausedError(f"policy paused: {policy!r} ({reason.decode()})")
            for policy, reason in zip(policies, reasons, strict=True) if reason is not None}


def refuse_unregistered(ctx: StageContext, policies: list[str]) -> dict[str, PoisonEventError]:
    if not ctx.settings.require_registered_policies:
        return {}
    return {policy: UnknownPolicyError(f"unknown policy {policy!r}: not registered in the "
                                       "catalog")
            for policy in policies if not ctx.index.exists(policy)}


# -- pauses ------------------------------------------------------------------------------------
def pause(ctx: StageContext, policy_id: str, stage: str, reason: str) -> PolicyPaused | None:
    """Mark the policy paused; returns the event to publish the first time only (else None)."""
    key = ctx.state.keys.paused(policy_id)
    first = ctx.state.r.hsetnx(key, "reason", reason[:500])
    if not first:
        return None
    ctx.state.r.hset(key, mapping={"stage": stage, "ts": time.time()})
    log.warning("pausing policy %s: %s", policy_id, reason)
    return PolicyPaused(event_id=derive_id("pause", policy_id, time.time_ns()),
                        policy_id=policy_id, stage=stage, reason=reason[:500])


def resume(ctx: StageContext, policy_id: str) -> PolicyResumed | None:
    """Lift a pause (operator action); the event to publish, or None if it was not paused."""
    key = ctx.state.keys.paused(policy_id)
    reason = cast("bytes | None", ctx.state.r.hget(key, "reason"))
    if not ctx.state.r.delete(key):
        return None
    return PolicyResumed(event_id=derive_id("resume", policy_id, time.time_ns()),
                         policy_id=policy_id,
                         paused_reason=reason.decode() if reason is not None else None)


def restore_pause(state: PolicyState, event: PolicyPaused | PolicyResumed) -> None:
    """Make Redis say what a replayed pause or resume event says (a rebuild after a flush)."""
    key = state.keys.paused(event.policy_id)
    if isinstance(event, PolicyResumed):
        state.r.delete(key)
        return
    state.r.hset(key, mapping={"reason": event.reason[:500], "stage": event.stage,
                               "ts": event.ts})


def paused_policies(ctx: StageContext) -> list[dict[str, str]]:
    """Every paused policy with the stage and reason that paused it."""
    prefix = ctx.state.keys.paused("")
    rows = []
    for key in ctx.state.r.scan_iter(match=prefix + "*", count=1000):
        raw = cast("dict[bytes, bytes]", ctx.state.r.hgetall(key))
        rows.append({"policy_id": key.decode()[len(prefix):],
                     "stage": raw.get(b"stage", b"").decode(),
                     "reason": raw.get(b"reason", b"").decode()})
    return sorted(rows, key=lambda r: r["policy_id"])


# -- online rollback ---------------------------------------------------------------------------
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
    if revision == 0 or ctx.index.serving(policy).revision != revision:
        return None  # only the serving revision's online reward decides about serving
    key = ctx.state.keys.online_rewards(policy, revision)
    size = ctx.settings.online_rollback_window
    # The reward stage's seen-marks drop redelivered rollouts before they get here, so a
    # redelivery is not counted twice.
    recent = push_window(ctx.state.r, key, sum(event.rewards) / len(event.rewards), size)
    mean = sum(recent) / len(recent)
    if len(recent) < size or mean >= threshold:
        return None
    reason = (f"online reward {mean:.4f} over the last {len(recent)} groups below "
              f"{threshold} for r{revision}")
    return rollback_once(ctx.state.r, ctx.state.keys, ctx.catalog, policy, revision, reason)
