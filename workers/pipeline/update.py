"""The update stage: `rewards` → `updates`, one batched GRPO step over every ready group of up
to eight policies (`workers/training/multitrainer.py`).

Every policy stepped gets its own `PolicyUpdated`; every `export_every` steps a policy stages
a revision. Each step is journaled and fenced before its output is sent
(`workers/pipeline/journal.py`): a worker killed anywhere in a step neither loses nor repeats
it, and with several update workers a policy is only ever stepped on top of its newest step
(`workers/pipeline/ownership.py`).
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.errors import PolicyFailures
from schemas.events import PolicyUpdated, RolloutRewarded
from schemas.ids import derive_id
from workers.pipeline import journal, ownership
from workers.pipeline.configs import configure_trainer, step_fields
from workers.pipeline.context import StageContext
from workers.pipeline.guards import Admission, refuse_paused
from workers.pipeline.inflight import FreedByTraining
from workers.pipeline.stage import Stage
from workers.pipeline.units import PerPolicyRounds

if TYPE_CHECKING:
    from workers.training.grpo import StepResult, TrainGroup

log = logging.getLogger(__name__)

FENCE_ATTEMPTS = 3
"""Rounds a unit gets when its steps are fenced off (another worker advanced the policy):
each round reloads the newest step and trains only what that step has not consumed."""

Batches = dict[str, list[RolloutRewarded]]


def update(ctx: StageContext, events: list[RolloutRewarded]) -> list[BaseModel]:
    """One batched GRPO step over every ready group of every policy in `events`: all policies'
    rows share ONE forward/backward over the base (`MultiPolicyTrainer.step_many`).

    Failures are per policy: if some policies fail and others trained, `PolicyFailures` carries
    the others' outputs so the runner sends them and dead-letters only the failed policies'
    events; a lone failure is raised as is.
    """
    by_policy: Batches = {}
    for e in events:
        by_policy.setdefault(e.policy_id, []).append(e)
    configure_trainer(ctx, list(by_policy))  # each policy's own rank, lr, objective knobs
    outputs: list[BaseModel] = []
    failures: dict[str, Exception] = {}
    pending = by_policy
    for _ in range(FENCE_ATTEMPTS):
        done, failed, stale = _round(ctx, pending)
        outputs += done
        failures.update(failed)
        if not stale:
            break
        pending = _not_yet_handled(ctx, {p: by_policy[p] for p in stale})
    else:
        failures.update({p: stale[p] for p in pending})
    ownership.stepped(ctx, [o.policy_id for o in outputs if isinstance(o, PolicyUpdated)])
    if failures and not outputs and len(failures) == 1:
        raise next(iter(failures.values()))
    if failures:
        raise PolicyFailures(outputs, failures)
    return outputs


def _round(ctx: StageContext, by_policy: Batches
           ) -> tuple[list[BaseModel], dict[str, Exception], dict[str, journal.StaleStep]]:
    """Bring each policy to its journal head, answer what the head consumed, train the rest;
    returns (outputs, failures, policies whose step was fenced off)."""
    failures: dict[str, Exception] = dict(ownership.sync_heads(ctx, list(by_policy)))
    replayed, fresh = journal.split_replayed(
        ctx, {p: evs for p, evs in by_policy.items() if p not in failures})
    batches = {policy: [_group(e) for e in evs] for policy, evs in fresh.items()}
    outputs: list[BaseModel] = list(replayed)
    stale: dict[str, journal.StaleStep] = {}
    for policy, result in (ctx.trainer.step_many(batches) if batches else {}).items():
        try:
            if isinstance(result, Exception):
                raise result
            out = _updated(ctx, policy, fresh[policy], result)
            try:
                journal.commit_step(ctx, out, fresh[policy])  # durable before it is sent
            except journal.StaleStep as exc:
                log.warning("update: %s", exc)
                ownership.forget(ctx, policy)
                if out.checkpoint is not None:
                    ctx.store.discard_staged(out.checkpoint)
                stale[policy] = exc
                continue
            outputs.append(out)
        except Exception as exc:
            failures[policy] = exc
    return outputs, failures, stale


def _not_yet_handled(ctx: StageContext, by_policy: Batches) -> Batches:
    """Events of fenced-off policies that no worker has marked handled since."""
    out: Batches = {}
    for policy, events in by_policy.items():
        seen = ctx.state.seen_many(STAGE.name, [e.event_id for e in events])
        left = [e for e, was in zip(events, seen, strict=True) if not was]
        if left:
            out[policy] = left
    return out


def _group(event: RolloutRewarded) -> TrainGroup:
    from workers.training.grpo import TrainGroup

    rollout = event.rollout
    return TrainGroup(prompt_ids=rollout.prompt_ids,
                      completions=[c.token_ids for c in rollout.completions],
                      old_logprobs=[c.logprobs for c in rollout.completions],
                      rewards=event.rewards, objective=rollout.objective)


def _updated(ctx: StageContext, policy: str, events: list[RolloutRewarded],
             result: StepResult) -> PolicyUpdated:
    """A stepped policy's PolicyUpdated, staging its revision when due (under a name of its
    own: a step fenced off must never overwrite the file of the step that won)."""
    checkpoint = None
    if result.step % ctx.settings.export_every == 0:
        staged = ctx.store.stage(policy, result.step, ctx.trainer.adapter_state(policy),
                                 tag=uuid.uuid4().hex[:8])
        checkpoint = ctx.store.location(staged)
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


def rebalanced(ctx: StageContext, partitions: set[int]) -> None:
    """Partitions of `rewards` this worker owns after a rebalance."""
    ownership.assigned(ctx, partitions)


STAGE = Stage(
    name="update", reads="rewards", event=RolloutRewarded, handle=update, writes="updates",
    units=PerPolicyRounds(policies=8), slots=FreedByTraining(),
    admission=Admission((refuse_paused,)), on_assigned=rebalanced, requires=("base_model",),
)
