"""Held-out evaluation: the promotion gate compares a candidate revision with what serves now."""

from __future__ import annotations

from schemas.events import InteractionLogged
from workers.rewards.functions import score_completions
from workers.serving.sampling import Sampler

_PROMPTS_PER_BATCH = 16


def evaluate_adapter(
    engine: Sampler,
    adapter: str | None,
    heldout: list[InteractionLogged],
    *,
    max_new_tokens: int,
    samples: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
) -> float:
    """Mean reward over `samples` completions per held-out interaction.

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
            [i.prompt for i in chunk], adapter, n=samples, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed + start,
        )
        for interaction, group in zip(chunk, groups, strict=True):
            rewards, _, _ = score_completions(interaction, [s.text for s in group])
            total += sum(rewards)
            count += len(rewards)
    return total / count
