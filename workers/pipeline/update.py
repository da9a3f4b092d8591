"""The update stage: `rewards` → `updates`, one batched GRPO step over every ready group of up
to eight policies (`workers/training/multitrainer.py`).

Every policy stepped gets its own `PolicyUpdated`; every `export_every` steps a policy stages
a revision and a resumable checkpoint. Each step is journaled before its output is sent
(`workers/pipeline/journal.py`), so a worker killed anywhere in a step neither loses nor
repeats it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.errors import PolicyFailures
from schemas.events import PolicyUpdated, RolloutRewarded
from schemas.ids import derive_id
from workers.pipeline import journal
from workers.pipeline.configs import configure_trainer, step_fields
from workers.pipeline.context import StageContext
from workers.pipeline.guards import Admission, refuse_paused
from workers.pipeline.inflight import FreedByTraining
from workers.pipeline.stage import Stage
from workers.pipeline.units import PerPolicyRounds

if TYPE_CHECKING:
    from workers.training.grpo import StepResult, TrainGroup


def update(ctx: StageContext, events: list[RolloutRewarded]) -> list[BaseModel]:
    """One batched GRPO step over every ready group of every policy in `events`: all policies'
    rows share ONE forward/backward over the base (`MultiPolicyTrainer.step_many`).

    Failures are per policy: if some policies fail and others trained, `PolicyFailures` carries
    the others' outputs so the runner sends them and dead-letters only the failed policies'
    events; a lone failure is raised as is.
    """
    by_policy: dict[str, list[RolloutRewarded]] = {}
    for e in events:
        by_policy.setdefault(e.policy_id, []).append(e)
    configure_trainer(ctx, list(by_policy))  # each policy's own rank, lr, objective knobs
    failures: dict[str, Exception] = {}
    for policy in by_policy:  # resume from the newest durable step (exactly-once after a crash)
        try:
            journal.restore_from_journal(ctx, policy)
        except Exception as exc:
            failures[policy] = exc
    replayed, by_policy = journal.split_replayed(ctx, by_policy)
    for policy in by_policy:
        if policy in failures:
            continue
        try:
            _restore_trainer(ctx, policy)
        except Exception as exc:  # e.g. an unreadable checkpoint: only this policy fails
            failures[policy] = exc
    batches = {policy: [_group(e) for e in evs]
               for policy, evs in by_policy.items() if policy not in failures}
    outputs: list[BaseModel] = list(replayed)
    for policy, result in (ctx.trainer.step_many(batches) if batches else {}).items():
        try:
            if isinstance(result, Exception):
                raise result
            out = _updated(ctx, policy, by_policy[policy], result)
            journal.commit_step(ctx, out, by_policy[policy])  # durable before it is sent
            outputs.append(out)
        except Exception as exc:
            failures[policy] = exc
    if failures and not outputs and len(failures) == 1:
        raise next(iter(failures.values()))
    if failures:
        raise PolicyFailures(outputs, failures)
    return outputs


def _group(event: RolloutRewarded) -> TrainGroup:
    from workers.training.grpo import TrainGroup

    rollout = event.rollout
    return TrainGroup(prompt_ids=rollout.prompt_ids,
                      completions=[c.token_ids for c in rollout.completions],
                      old_logprobs=[c.logprobs for c in rollout.completions],
                      rewards=event.rewards, objective=rollout.objective)


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
        **step_fields(ctx, policy, events),
    )


def _restore_trainer(ctx: StageContext, policy: str) -> None:
    """After a restart, continue from the last checkpoint instead of a fresh adapter."""
    if ctx.trainer.has_policy(policy):
        return
    if ctx.state.checkpoint_step(policy) is not None:
        ctx.trainer.load_checkpoint(policy, ctx.store.root / "checkpoints" / policy)


STAGE = Stage(
    name="update", reads="rewards", event=RolloutRewarded, handle=update, writes="updates",
    units=PerPolicyRounds(policies=8), slots=FreedByTraining(),
    admission=Admission((refuse_paused,)),
)
