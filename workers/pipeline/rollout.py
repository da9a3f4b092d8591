"""The rollout stage: training interactions of many policies sampled in one engine pass.

`interactions` → `rollouts`. `rollout_many` is what the stream calls with a unit of
interactions (`WithinInFlightRoom` forms the units); `rollout` is its one-event form. Held-out
prompts take `store_heldout`, a whole-batch path: they are only stored, never sampled. Logs
whose objective is `sft` or `dpo` are not sampled either: their logged targets or pairs become
the group (`workers/pipeline/offline.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.errors import EventFailures, RetryableError
from schemas.events import Completion, InteractionLogged, RolloutGenerated
from schemas.ids import derive_id, derive_seed
from workers.pipeline.context import StageContext
from workers.pipeline.guards import Admission, refuse_paused, refuse_unregistered
from workers.pipeline.inflight import TakenBySampling
from workers.pipeline.offline import offline_rollout
from workers.pipeline.stage import Stage
from workers.pipeline.units import WithinInFlightRoom

if TYPE_CHECKING:
    from workers.serving.sampling import Sample

log = logging.getLogger(__name__)


def store_heldout(ctx: StageContext, interactions: list[InteractionLogged],
                  records: list[bytes | None]) -> list[str]:
    """The bulk path: store a batch's held-out prompts in one Redis round trip.

    Held-out prompts are only stored, never sampled, so they need none of the per-event
    machinery (throttle, engine, outputs); at ingest rates that machinery is the cost. The
    store is a hash field per event id, so storing a redelivered prompt again is harmless (the
    runner writes no seen-mark for these); each is stored as its record came off Kafka.
    Returns the ids handled; anything else (training prompts, an unknown reward function)
    takes the per-event path, which samples or dead-letters it.
    """
    held = {i.event_id for i in storable_heldout(interactions, ctx)}
    kept = [(i, r) for i, r in zip(interactions, records, strict=True) if i.event_id in held]
    if kept:
        ctx.state.add_heldout_many([i for i, _ in kept], [r for _, r in kept])
    return [i.event_id for i, _ in kept]


def storable_heldout(interactions: list[InteractionLogged],
                     ctx: StageContext) -> list[InteractionLogged]:
    """The held-out prompts the evaluate stage can score (their reward exists). Chat
    `messages` take the per-event path, which checks that the base can render them."""
    eval_ = [i for i in interactions if i.split == "eval" and i.messages is None]
    configs = ctx.configs.get_many([i.policy_id for i in eval_])
    return [i for i in eval_ if configs[i.policy_id].reward_for(i) in ctx.rewards]


def rollout(ctx: StageContext, interaction: InteractionLogged) -> list[BaseModel]:
    """Sample G completions from the policy's training head; held-out prompts are only stored.

    The one-event form of `rollout_many`: the same code, ids and samples (a lone failure is
    raised as is, not wrapped in `EventFailures`).
    """
    return rollout_many(ctx, [interaction])


@dataclass(frozen=True)
class _Planned:
    """A training interaction ready to sample: the head revision it samples from, and the
    engine's name for that revision's adapter (None: the bare base)."""

    interaction: InteractionLogged
    revision: int
    adapter: str | None
    prompt_ids: list[int]
    """The rendered prompt (chat template applied): what is sampled, and what the trainer
    trains on."""
    objective: str = "grpo"


def rollout_many(ctx: StageContext,
                 interactions: Sequence[InteractionLogged]) -> list[BaseModel]:
    """Sample every training interaction of `interactions` (any mix of policies) in ONE engine
    call; store the held-out ones. One `RolloutGenerated` per training interaction, in order
    (an `sft` or `dpo` log gives its logged group instead, or none while it has none yet).

    Each interaction samples from its own policy's training head with its own derived seed, so
    its rollout (ids, revision, samples) is what `rollout` gives it alone: batching is only a
    transport decision. Rows of different adapters share the engine's forwards, which is why
    the stream hands this whole units of interactions.

    Failures are per interaction: an unknown reward function (or a policy whose head cannot be
    loaded) fails only its own interactions, raised as `EventFailures` with the others'
    rollouts, so the runner sends those and dead-letters just the failed ones. A transient
    failure (`RetryableError`) fails the whole call: nothing was sent, and a retry samples the
    same rows again.
    """
    failures: dict[str, Exception] = {}
    heads: dict[str, tuple[int, str | None] | Exception] = {}
    planned: list[_Planned] = []
    for interaction in interactions:
        try:
            p = _plan_rollout(ctx, interaction, heads)
        except RetryableError:
            raise
        except Exception as exc:
            failures[interaction.event_id] = exc
            continue
        if p is not None:
            planned.append(p)
    logged = _logged(ctx, [p for p in planned if p.objective != "grpo"], failures)
    samples = _sample_planned(ctx, [p for p in planned if p.objective == "grpo"], failures)
    outputs: list[BaseModel] = []
    for p in planned:
        eid = p.interaction.event_id
        if p.objective != "grpo":
            if (group := logged.get(eid)) is not None:
                outputs.append(group)
        elif eid in samples:
            outputs.append(_rollout_event(ctx, p, samples[eid]))
    if failures and len(interactions) == 1:
        raise next(iter(failures.values()))
    if failures:
        raise EventFailures(outputs, failures)
    return outputs


def _plan_rollout(ctx: StageContext, interaction: InteractionLogged,
                  heads: dict[str, tuple[int, str | None] | Exception]) -> _Planned | None:
    """Check one interaction, store it if held out, else resolve its policy's head adapter
    (once per policy per call: `heads` caches the revision, or the error every one of that
    policy's interactions then fails with). Its reward and objective are its own, else its
    policy's (`workers/pipeline/configs.py`); logged targets need no head."""
    config = ctx.configs.get(interaction.policy_id)
    ctx.rewards.get(config.reward_for(interaction))  # unknown: poison, before any sampling
    if interaction.split == "eval":
        if interaction.messages is not None:
            ctx.engine.render(interaction.prompt, interaction.chat())  # refusable now, not later
        ctx.state.add_heldout(interaction)
        return None
    objective = config.objective_for(interaction)
    if objective != "grpo":
        return _Planned(interaction, 0, None, [], objective)  # offline.py renders its own
    policy = interaction.policy_id
    if policy not in heads:
        try:
            head = ctx.index.head(policy)
            heads[policy] = (head.revision, ctx.adapter_for(policy, head))
        except RetryableError:
            raise
        except Exception as exc:
            heads[policy] = exc
    resolved = heads[policy]
    if isinstance(resolved, Exception):
        raise resolved
    prompt_ids = ctx.engine.render(interaction.prompt, interaction.chat())
    return _Planned(interaction, *resolved, prompt_ids)


def _logged(ctx: StageContext, planned: list[_Planned],
            failures: dict[str, Exception]) -> dict[str, RolloutGenerated | None]:
    """The groups of logged targets and pairs (None: nothing to train on yet)."""
    out: dict[str, RolloutGenerated | None] = {}
    for p in planned:
        try:
            out[p.interaction.event_id] = offline_rollout(ctx, p.interaction, p.objective)
        except RetryableError:
            raise
        except Exception as exc:
            failures[p.interaction.event_id] = exc
    return out


def _sample_planned(ctx: StageContext, planned: list[_Planned],
                    failures: dict[str, Exception]) -> dict[str, list[Sample]]:
    """Every planned interaction's G samples by event id, from one `generate_many` call.

    If the engine refuses the mixed call (not a transient failure), each adapter's rows are
    asked for on their own, so an adapter the engine cannot serve fails only its policy's
    interactions (recorded in `failures`), never its batch-mates'. That costs extra calls only
    on the failure path.
    """
    from workers.serving.sampling import SampleRequest

    if not planned:
        return {}
    s = ctx.settings
    requests = [SampleRequest(p.prompt_ids, p.adapter, derive_seed(p.interaction.event_id))
                for p in planned]
    try:
        groups = ctx.engine.generate_many(requests, n=s.group_size,
                                          max_new_tokens=s.max_new_tokens,
                                          temperature=s.temperature)
        return {p.interaction.event_id: g for p, g in zip(planned, groups, strict=True)}
    except RetryableError:
        raise
    except Exception as exc:
        by_adapter: dict[str | None, list[_Planned]] = {}
        for p in planned:
            by_adapter.setdefault(p.adapter, []).append(p)
        if len(by_adapter) == 1:
            failures.update({p.interaction.event_id: exc for p in planned})
            return {}
        log.warning("engine refused a batch of %d adapters (%s); sampling each on its own",
                    len(by_adapter), exc)
        out: dict[str, list[Sample]] = {}
        for group in by_adapter.values():
            out.update(_sample_planned(ctx, group, failures))
        return out


def _rollout_event(ctx: StageContext, p: _Planned, samples: list[Sample]) -> RolloutGenerated:
    """The rollout of one interaction; its id is derived from the interaction's, so a
    redelivered interaction gives the same id and the reward stage drops the copy."""
    interaction = p.interaction
    return RolloutGenerated(
        event_id=derive_id("rollout", interaction.event_id),
        policy_id=interaction.policy_id,
        interaction=interaction,
        revision=p.revision,
        prompt_ids=p.prompt_ids,
        completions=[Completion(text=x.text, token_ids=x.token_ids, logprobs=x.logprobs,
                                finished=x.finished) for x in samples],
        temperature=ctx.settings.temperature,
    )


STAGE = Stage(
    name="rollout", reads="interactions", event=InteractionLogged, handle=rollout_many,
    writes="rollouts", units=WithinInFlightRoom(), bulk=store_heldout, slots=TakenBySampling(),
    admission=Admission((refuse_paused, refuse_unregistered)), requires=("base_model", "engine"),
)
