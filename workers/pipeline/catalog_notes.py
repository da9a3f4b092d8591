"""What the export, evaluate and promote stages tell the catalog, kept out of `stages.py` so the
stage functions stay short: provenance notes, revision numbering, evaluation records and the
lifecycle check on promotion.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from schemas.catalog import LoraConfig, RevisionEvaluated
from schemas.events import AdapterEvaluated, PolicyUpdated
from schemas.ids import derive_id
from workers.catalog.lifecycle import IllegalTransitionError, RevisionState
from workers.catalog.provenance import StepLog, build_provenance, cached_base_hash

if TYPE_CHECKING:
    from workers.artifacts.store import ArtifactRef
    from workers.pipeline.context import StageContext

log = logging.getLogger(__name__)


def note_step(ctx: StageContext, event: PolicyUpdated) -> None:
    """Remember a trainer step until the revision it ends up in is recorded."""
    StepLog(ctx.settings, ctx.state.r).note(event)


def record_export(ctx: StageContext, event: PolicyUpdated, ref: ArtifactRef) -> int:
    """Register the policy if new, record the revision with its provenance, return its number."""
    catalog, pid = ctx.catalog, event.policy_id
    base_hash = cached_base_hash(str(ctx.base_path))
    lora = ctx.lora
    catalog.register(pid, base_model=str(ctx.base_path), base_model_hash=base_hash,
                     lora=LoraConfig(rank=lora.rank, alpha=lora.alpha,
                                     target_modules=lora.target_modules))
    entry = catalog.entry(pid)
    parent_step = entry.revisions[entry.head].step if entry.head else 0
    steps = StepLog(ctx.settings, ctx.state.r)
    notes = steps.steps(pid, after=parent_step, upto=event.step)
    provenance = build_provenance(ctx.settings, notes, parent=entry.head, base_hash=base_hash,
                                  first_step=parent_step + 1, last_step=event.step,
                                  fallback_ts=event.ts)
    record = catalog.record_revision(pid, step=event.step, sha256=ref.sha256,
                                     size_bytes=ref.size_bytes, provenance=provenance)
    steps.forget(pid, upto=event.step)
    return record.revision


def record_evaluation(ctx: StageContext, out: AdapterEvaluated) -> None:
    ctx.catalog.record_evaluation(RevisionEvaluated(
        event_id=derive_id("catalog-eval", out.event_id), policy_id=out.policy_id,
        revision=out.revision, score=out.score, baseline_revision=out.baseline_revision,
        baseline_score=out.baseline_score, prompts=out.prompts, passed=out.passed,
        reason=out.reason))


def promote(ctx: StageContext, event: AdapterEvaluated) -> bool:
    """Move the catalog's aliases; False when the lifecycle forbids it (e.g. the revision was
    rolled back since this evaluation was written), so the stage skips it."""
    try:
        ctx.catalog.promote(event.policy_id, event.revision, event.reason or "passed evaluation")
    except IllegalTransitionError as exc:
        log.info("not promoting %s r%d: %s", event.policy_id, event.revision, exc)
        return False
    return True


def reject(ctx: StageContext, policy_id: str, revision: int, reason: str) -> None:
    """Best effort: mark a revision rejected (its artifact failed a check)."""
    try:
        ctx.catalog.transition(policy_id, revision, RevisionState.REJECTED, reason)
    except (IllegalTransitionError, ValueError) as exc:
        log.warning("could not reject %s r%d: %s", policy_id, revision, exc)
