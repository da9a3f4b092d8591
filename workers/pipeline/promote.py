"""The promote stage and the one place that decides promotion: `evaluations` → `promotions`.

A revision is promoted when its score on the held-out selection set beats the serving
revision's by more than `promote_margin` (`verdict`, which the evaluate stage records), and
still beats what serves when the promotion is applied (`check_still_better`): a better revision
may have been promoted since the evaluation. The test set's score is reported, never compared.
The catalog then checks only that the lifecycle allows the move, moves the
serving alias and, with it, the hot set that engines follow.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from schemas.errors import PoisonEventError
from schemas.events import AdapterEvaluated, PolicyPromoted
from schemas.ids import derive_id
from workers.catalog.entries import serve_name
from workers.catalog.lifecycle import IllegalTransitionError, RevisionState
from workers.pipeline.context import StageContext
from workers.pipeline.stage import Stage, single
from workers.pipeline.state import score_key, split_heldout

log = logging.getLogger(__name__)


class NotBetterError(PoisonEventError):
    """A promotion whose revision does not beat the serving one: it never serves."""


def verdict(score: float, baseline: float, margin: float, revision: int,
            serving_revision: int) -> tuple[bool, str]:
    """Whether a candidate scored against the serving revision passes, and why in words."""
    passed = score > baseline + margin and revision > serving_revision
    says = "beats" if passed else "does not beat"
    return passed, f"{score:.4f} {says} serving r{serving_revision} {baseline:.4f} (+{margin})"


def check_still_better(ctx: StageContext, event: AdapterEvaluated, serving: int) -> None:
    """Refuse a promotion that does not beat what serves *now*.

    The verdict was reached against the revision serving at evaluation time; if another
    revision was promoted since, compare with that one's score on the same held-out set (the
    evaluate stage cached it when it was a candidate), and refuse when it is unknown.
    """
    margin = ctx.settings.promote_margin
    score, baseline = selection_scores(event)
    if not score > baseline + margin:
        raise NotBetterError(f"r{event.revision} scored {score:.4f}, not above serving "
                             f"r{event.baseline_revision} {baseline:.4f} + {margin}")
    if serving in (event.baseline_revision, event.revision) or event.revision < serving:
        return  # compared with what serves; an older revision is skipped by the stage
    selection, _ = split_heldout(ctx.state.heldout(event.policy_id))
    current = ctx.state.cached_score(event.policy_id, score_key(serving, selection))
    if current is None or not score > current + margin:
        raise NotBetterError(f"r{event.revision} ({score:.4f}) was evaluated against "
                             f"r{event.baseline_revision}, but r{serving} serves now "
                             f"({current if current is not None else 'score unknown'})")


def selection_scores(event: AdapterEvaluated) -> tuple[float, float]:
    """(candidate, serving) on the selection set: what the gate compares."""
    if event.selection_score is None or event.selection_baseline_score is None:
        return event.score, event.baseline_score  # too few held-out prompts to split
    return event.selection_score, event.selection_baseline_score


def promote(ctx: StageContext, event: AdapterEvaluated) -> list[BaseModel]:
    """Serve a revision that passed its evaluation and still beats what serves now."""
    if not event.passed:
        return []
    serving = ctx.index.serving(event.policy_id).revision
    check_still_better(ctx, event, serving)
    if event.revision <= serving:
        return []  # an older or the same revision: a redelivery, or overtaken by a newer one
    if not ctx.store.verify(event.sha256):
        _reject(ctx, event.policy_id, event.revision, "artifact sha256 mismatch")
        raise PoisonEventError(f"artifact {event.sha256} failed its sha256 check")
    try:
        ctx.catalog.promote(event.policy_id, event.revision, event.reason or "passed evaluation")
    except IllegalTransitionError as exc:  # e.g. rolled back since this evaluation was written
        log.info("not promoting %s r%d: %s", event.policy_id, event.revision, exc)
        return []
    return [
        PolicyPromoted(
            event_id=derive_id("promote", event.policy_id, event.revision),
            policy_id=event.policy_id,
            revision=event.revision,
            previous_revision=serving,
            score=event.score,
            sha256=event.sha256,
            path=event.path,
            serve_name=serve_name(event.policy_id, event.revision),
        )
    ]


def _reject(ctx: StageContext, policy_id: str, revision: int, reason: str) -> None:
    """Best effort: mark a revision rejected (its artifact failed a check)."""
    try:
        ctx.catalog.transition(policy_id, revision, RevisionState.REJECTED, reason)
    except (IllegalTransitionError, ValueError) as exc:
        log.warning("could not reject %s r%d: %s", policy_id, revision, exc)


STAGE = Stage(name="promote", reads="evaluations", event=AdapterEvaluated,
              handle=single(promote), writes="promotions")
