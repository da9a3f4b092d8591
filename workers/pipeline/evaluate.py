"""The evaluate stage: `exports` → `evaluations`, a revision scored on the policy's held-out
prompts next to the revision serving now (same prompts, same seeds), with the promotion
verdict of `workers.pipeline.promote.verdict`.

The held-out prompts are split (`workers.pipeline.state.split_heldout`): the verdict compares
the two revisions on the selection set; the reported `score` and `baseline_score` are on the
test set, which no decision looks at. Held-out completions are scored by the policy's reward,
else each prompt's task (`workers/rewards/registry.py`: built-ins, plugins, HTTP judges).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas.catalog import RevisionEvaluated
from schemas.events import AdapterEvaluated, AdapterExported, InteractionLogged
from schemas.ids import derive_id
from workers.catalog.entries import RevisionPointer
from workers.pipeline.context import StageContext
from workers.pipeline.promote import verdict
from workers.pipeline.stage import Stage, single
from workers.pipeline.state import score_key, split_heldout
from workers.rewards.functions import score_completions

if TYPE_CHECKING:
    from workers.serving.sampling import Sampler

EVAL_SEED = 1234
EVAL_SAMPLES = 4
_SHARED = (set(RevisionEvaluated.model_fields) & set(AdapterEvaluated.model_fields)) - {
    "event_id", "kind", "ts", "schema_version"}
"""What the catalog's evaluation record says of the evaluation event (policy, revision,
scores, verdict): the same fields, so the two cannot drift."""

_PROMPTS_PER_BATCH = 16

GroupScorer = Callable[[Sequence[tuple[InteractionLogged, list[str]]]], list[list[float]]]
"""Rewards of held-out groups (interaction, completion texts), raising what fails."""


def _builtin(groups: Sequence[tuple[InteractionLogged, list[str]]]) -> list[list[float]]:
    return [score_completions(i, texts)[0] for i, texts in groups]


def evaluate_adapter(
    engine: Sampler,
    adapter: str | None,
    heldout: list[InteractionLogged],
    *,
    max_new_tokens: int,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    score: GroupScorer = _builtin,
) -> float:
    """Mean reward over `samples` completions per held-out interaction (built-in rewards unless
    `score` says otherwise).

    The seed is fixed per batch of prompts, so two revisions scored with the same arguments
    draw the same random numbers (common random numbers): their difference reflects the
    weights, not sampling luck.
    """
    if not heldout:
        raise ValueError("evaluate_adapter needs at least one held-out interaction")
    total, count = 0.0, 0
    for start in range(0, len(heldout), _PROMPTS_PER_BATCH):
        chunk = heldout[start:start + _PROMPTS_PER_BATCH]
        groups = engine.generate(
            [engine.render(i.prompt, i.chat()) for i in chunk], adapter, n=samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed + start,
        )
        scored = score([(i, [s.text for s in g]) for i, g in zip(chunk, groups, strict=True)])
        for rewards in scored:
            total += sum(rewards)
            count += len(rewards)
    return total / count


def evaluate(ctx: StageContext, event: AdapterExported) -> list[BaseModel]:
    """Score the revision on held-out prompts next to the revision serving now."""
    policy = event.policy_id
    heldout = ctx.state.heldout(policy)
    serving = ctx.index.serving(policy)
    selection, test = split_heldout(heldout)
    chosen: dict[str, float | int | None] = {}
    if not heldout:
        score = baseline = 0.0
        passed, reason = False, "no held-out prompts for this policy (send split='eval')"
    else:
        candidate = RevisionPointer(event.revision, sha256=event.sha256, path=event.path)
        picked = _score(ctx, policy, candidate, selection)
        picked_base = _score(ctx, policy, serving, selection)
        passed, reason = verdict(picked, picked_base, ctx.settings.promote_margin,
                                 event.revision, serving.revision)
        score, baseline = picked, picked_base
        if test is not selection:  # reported on prompts nothing was selected on
            score = _score(ctx, policy, candidate, test)
            baseline = _score(ctx, policy, serving, test)
            chosen = {"selection_score": picked, "selection_baseline_score": picked_base,
                      "selection_prompts": len(selection)}
            reason += f" on {len(selection)} selection prompts; test set {score:.4f}"
    out = AdapterEvaluated(
        event_id=derive_id("evaluate", event.event_id),
        policy_id=policy,
        revision=event.revision,
        sha256=event.sha256,
        path=event.path,
        score=score,
        baseline_revision=serving.revision,
        baseline_score=baseline,
        prompts=len(test),
        passed=passed,
        reason=reason,
        **chosen,  # type: ignore[arg-type]
    )
    ctx.catalog.record_evaluation(RevisionEvaluated(
        event_id=derive_id("catalog-eval", out.event_id), **out.model_dump(include=_SHARED)))
    return [out]


def _score(ctx: StageContext, policy: str, rev: RevisionPointer,
           heldout: list[InteractionLogged]) -> float:
    """Held-out score of a revision, cached per (revision, held-out set)."""
    key = score_key(rev.revision, heldout)
    cached = ctx.state.cached_score(policy, key)
    if cached is not None:
        return cached
    config = ctx.configs.get(policy)

    def score_groups(groups: Sequence[tuple[InteractionLogged, list[str]]]
                     ) -> list[list[float]]:
        results = ctx.rewards.score_many_sync([(config.reward_for(i), i, texts)
                                               for i, texts in groups])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [r for r in results if not isinstance(r, Exception)]

    score = evaluate_adapter(
        ctx.engine, ctx.adapter_for(policy, rev), heldout,
        max_new_tokens=ctx.settings.max_new_tokens, samples=EVAL_SAMPLES, seed=EVAL_SEED,
        temperature=ctx.settings.temperature, score=score_groups,
    )
    ctx.state.cache_score(policy, key, score)
    return score


STAGE = Stage(name="evaluate", reads="exports", event=AdapterExported, handle=single(evaluate),
              writes="evaluations", requires=("base_model", "engine"))
