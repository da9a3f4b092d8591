"""The pipeline's stages as plain functions: one input event in, zero or more events out.

Stream agents only decode, call these, and send. Each output's id is derived from its input, so
re-processing a redelivered event reproduces the same ids and downstream stages drop it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.errors import PoisonEventError, PolicyFailures
from schemas.events import (
    AdapterEvaluated,
    AdapterExported,
    InteractionLogged,
    PolicyPromoted,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
)
from schemas.ids import derive_id
from workers.pipeline import catalog_notes as catalog_stages
from workers.pipeline import journal as step_journal
from workers.pipeline.context import StageContext
from workers.pipeline.rollout import rollout as rollout
from workers.pipeline.rollout import rollout_many as rollout_many
from workers.pipeline.state import RevisionPointer, serve_name

if TYPE_CHECKING:
    from workers.training.grpo import StepResult

EVAL_SEED = 1234
EVAL_SAMPLES = 4


def store_heldout(ctx: StageContext, interactions: list[InteractionLogged]) -> list[str]:
    """The rollout stage's bulk path: store a batch's held-out prompts in one Redis round trip.

    Held-out prompts are only stored, never sampled, so they need none of the per-event
    machinery (throttle, engine, outputs); at ingest rates that machinery is the cost. Returns
    the ids handled; anything else (training prompts, an unknown reward function) takes the
    per-event path, which samples or dead-letters it.
    """
    held = storable_heldout(interactions)
    if held:
        ctx.state.add_heldout_many(held)
    return [i.event_id for i in held]


def storable_heldout(interactions: list[InteractionLogged]) -> list[InteractionLogged]:
    """The held-out prompts the evaluate stage can score (its reward function exists)."""
    from workers.rewards.functions import REWARD_FUNCTIONS

    return [i for i in interactions if i.split == "eval" and i.task in REWARD_FUNCTIONS]


def reward(ctx: StageContext, event: RolloutGenerated) -> list[BaseModel]:
    """Score every completion with the reward function the interaction's task names."""
    from workers.rewards.functions import score_completions

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


def update(ctx: StageContext, events: list[RolloutRewarded]) -> list[BaseModel]:
    """One batched GRPO step over every ready group of every policy in `events`: all policies'
    rows share ONE forward/backward over the base (`MultiPolicyTrainer.step_many`), and each
    policy stepped gets its own PolicyUpdated. Every `export_every` steps a policy stages a
    revision (the trainer owns the optimizer, so it also writes the resumable checkpoint).

    Failures are per policy: if some policies fail and others trained, `PolicyFailures` carries
    the others' outputs so the runner sends them and dead-letters only the failed policies'
    events; a lone failure is raised as is.
    """
    from workers.training.grpo import TrainGroup

    by_policy: dict[str, list[RolloutRewarded]] = {}
    for e in events:
        by_policy.setdefault(e.policy_id, []).append(e)
    failures: dict[str, Exception] = {}
    for policy in by_policy:  # resume from the newest durable step (exactly-once after a crash)
        try:
            step_journal.restore_from_journal(ctx, policy)
        except Exception as exc:
            failures[policy] = exc
    replayed, by_policy = step_journal.split_replayed(ctx, by_policy)
    for policy in by_policy:
        if policy in failures:
            continue
        try:
            _restore_trainer(ctx, policy)
        except Exception as exc:  # e.g. an unreadable checkpoint: only this policy fails
            failures[policy] = exc
    batches = {
        policy: [TrainGroup(prompt_ids=e.rollout.prompt_ids,
                            completions=[c.token_ids for c in e.rollout.completions],
                            old_logprobs=[c.logprobs for c in e.rollout.completions],
                            rewards=e.rewards) for e in evs]
        for policy, evs in by_policy.items() if policy not in failures
    }
    outputs: list[BaseModel] = list(replayed)
    for policy, result in (ctx.trainer.step_many(batches) if batches else {}).items():
        try:
            if isinstance(result, Exception):
                raise result
            out = _updated(ctx, policy, by_policy[policy], result)
            step_journal.commit_step(ctx, out, by_policy[policy])  # durable before it is sent
            outputs.append(out)
        except Exception as exc:
            failures[policy] = exc
    if failures and not outputs and len(failures) == 1:
        raise next(iter(failures.values()))
    if failures:
        raise PolicyFailures(outputs, failures)
    return outputs


def _updated(ctx: StageContext, policy: str, events: list[RolloutRewarded],
             result: StepResult) -> PolicyUpdated:
    """A stepped policy's PolicyUpdated, staging its revision and checkpoint when due."""
    trainer = ctx.trainer
    checkpoint = None
    if result.step % ctx.settings.export_every == 0:
        staged = ctx.store.stage(policy, result.step, trainer.adapter_state(policy))
        checkpoint = str(staged)
        trainer.save_checkpoint(policy, ctx.store.root / "checkpoints" / policy)
        ctx.state.set_checkpoint(policy, result.step)
    return PolicyUpdated(
        event_id=derive_id("update", *sorted(e.event_id for e in events)),
        policy_id=policy,
        step=result.step,
        loss=result.loss,
        mean_reward=result.mean_reward,
        kl=result.kl,
        grad_norm=result.grad_norm,
        tokens=result.tokens,
        rollout_ids=[e.rollout.event_id for e in events],
        checkpoint=checkpoint,
        sources=[s for e in events if (s := ctx.source_of(e.event_id)) is not None],
        reward_fns={e.reward_fn: e.reward_version for e in events},
    )


def _restore_trainer(ctx: StageContext, policy: str) -> None:
    """After a restart, continue from the last checkpoint instead of a fresh adapter."""
    if ctx.trainer.has_policy(policy):
        return
    if ctx.state.checkpoint_step(policy) is not None:
        ctx.trainer.load_checkpoint(policy, ctx.store.root / "checkpoints" / policy)


def export(ctx: StageContext, event: PolicyUpdated) -> list[BaseModel]:
    """Write the staged adapter as a content-addressed PEFT revision and number it."""
    from workers.artifacts.store import adapter_config

    catalog_stages.note_step(ctx, event)
    if event.checkpoint is None:
        return []
    staged = Path(event.checkpoint)
    if not staged.resolve().is_relative_to(ctx.store.root.resolve()):
        raise PoisonEventError(f"staged checkpoint {staged} is outside the artifact store")
    tensors = ctx.store.load_tensors(staged)
    base_name = str(ctx.base_path)
    ref = ctx.store.put_adapter(tensors, adapter_config(ctx.lora, base_name))
    revision = catalog_stages.record_export(ctx, event, ref)  # gapless, same step = same number
    ctx.state.record_revision(
        event.policy_id, RevisionPointer(revision, sha256=ref.sha256, path=str(ref.path))
    )
    return [
        AdapterExported(
            event_id=derive_id("export", event.policy_id, event.step),
            policy_id=event.policy_id,
            revision=revision,
            step=event.step,
            parent_revision=revision - 1,
            sha256=ref.sha256,
            path=str(ref.path),
            size_bytes=ref.size_bytes,
            rank=ctx.lora.rank,
            alpha=ctx.lora.alpha,
            base_model=base_name,
        )
    ]


def _score(ctx: StageContext, policy: str, rev: RevisionPointer, fingerprint: str) -> float:
    """Held-out score of a revision, cached per (revision, held-out set)."""
    from workers.pipeline.evaluate import evaluate_adapter

    key = f"{rev.revision}:{fingerprint}"
    cached = ctx.state.cached_score(policy, key)
    if cached is not None:
        return cached
    score = evaluate_adapter(
        ctx.engine,
        ctx.adapter_for(policy, rev),
        ctx.state.heldout(policy),
        max_new_tokens=ctx.settings.max_new_tokens,
        samples=EVAL_SAMPLES,
        seed=EVAL_SEED,
        temperature=ctx.settings.temperature,
    )
    ctx.state.cache_score(policy, key, score)
    return score


def evaluate(ctx: StageContext, event: AdapterExported) -> list[BaseModel]:
    """Score the revision on held-out prompts next to the revision serving now."""
    policy = event.policy_id
    heldout = ctx.state.heldout(policy)
    fingerprint = hashlib.sha256("".join(h.event_id for h in heldout).encode()).hexdigest()[:12]
    serving = ctx.state.serving(policy)
    candidate = RevisionPointer(event.revision, sha256=event.sha256, path=event.path)
    if not heldout:
        score = baseline = 0.0
        passed, reason = False, "no held-out prompts for this policy (send split='eval')"
    else:
        score = _score(ctx, policy, candidate, fingerprint)
        baseline = _score(ctx, policy, serving, fingerprint)
        margin = ctx.settings.promote_margin
        passed = score > baseline + margin and event.revision > serving.revision
        verdict = "beats" if passed else "does not beat"
        reason = f"{score:.4f} {verdict} serving r{serving.revision} {baseline:.4f} (+{margin})"
    out = AdapterEvaluated(
        event_id=derive_id("evaluate", event.event_id),
        policy_id=policy,
        revision=event.revision,
        sha256=event.sha256,
        path=event.path,
        score=score,
        baseline_revision=serving.revision,
        baseline_score=baseline,
        prompts=len(heldout),
        passed=passed,
        reason=reason,
    )
    catalog_stages.record_evaluation(ctx, out)
    return [out]


def promote(ctx: StageContext, event: AdapterEvaluated) -> list[BaseModel]:
    """Move the serving alias and the hot set to a revision that passed its evaluation."""
    if not event.passed:
        return []
    serving = ctx.state.serving(event.policy_id)
    if event.revision <= serving.revision:
        return []  # an older or the same revision: a redelivery, or overtaken by a newer one
    if not ctx.store.verify(event.sha256):
        catalog_stages.reject(ctx, event.policy_id, event.revision, "artifact sha256 mismatch")
        raise PoisonEventError(f"artifact {event.sha256} failed its sha256 check")
    if not catalog_stages.promote(ctx, event):  # the lifecycle refuses (e.g. rolled back)
        return []
    ctx.state.set_serving(event.policy_id, event.revision)
    return [
        PolicyPromoted(
            event_id=derive_id("promote", event.policy_id, event.revision),
            policy_id=event.policy_id,
            revision=event.revision,
            previous_revision=serving.revision,
            score=event.score,
            sha256=event.sha256,
            path=event.path,
            serve_name=serve_name(event.policy_id, event.revision),
        )
    ]
