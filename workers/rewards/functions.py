"""The built-in reward functions (`reference`, `length`, `feedback`), registered by name like any
plugin (`workers/rewards/registry.py`).

Every reward is graded (partial credit), not pass/fail: GRPO learns only from reward
differences inside a group, and a tiny random model would almost never hit an exact target, so
all-equal groups (zero advantage) would leave it nothing to learn from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from schemas.errors import PoisonEventError
from schemas.events import InteractionLogged
from workers.rewards.registry import declare

RewardFn = Callable[[InteractionLogged, str], float]

_CHAR_WINDOW = 32.0
"""Codepoint distance at which a wrong char stops earning partial credit in `reference`."""

CHARSETS: dict[str, Callable[[str], bool]] = {
    "digits": str.isdigit,
    "alpha": str.isalpha,
    "lower": str.islower,
    "upper": str.isupper,
    "alnum": str.isalnum,
    "space": str.isspace,
}


def _char_credit(a: str, b: str) -> float:
    """1 for the right char, less for chars near it in codepoint order, 0 beyond the window.

    Near-misses earning something is what makes the signal learnable from a random start.
    """
    if a == b:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(ord(a) - ord(b)) / _CHAR_WINDOW)


def graded_similarity(completion: str, target: str) -> float:
    """0.75 x position-wise graded char match + 0.25 x length closeness, 1.0 only if exact.

    The match is divided by the target length, and the length term penalises extra or missing
    chars; the length term alone gives a random model a quickly learnable gradient.
    """
    n = len(target)
    if n == 0:
        return 1.0 / (1.0 + len(completion))
    match = sum(_char_credit(a, b) for a, b in zip(completion, target, strict=False)) / n
    size = n / (n + abs(len(completion) - n))
    return 0.75 * match + 0.25 * size


@declare(version=1, inline=True)
def reference_reward(interaction: InteractionLogged, completion: str) -> float:
    """Graded similarity to the interaction's reference answer."""
    if interaction.reference is None:
        raise PoisonEventError("task 'reference' needs a 'reference' field")
    return graded_similarity(completion, interaction.reference)


def _param_float(interaction: InteractionLogged, key: str, default: float) -> float:
    value = interaction.task_params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PoisonEventError(f"task_params[{key!r}] must be a number, got {value!r}")
    return float(value)


@declare(version=1, inline=True)
def length_reward(interaction: InteractionLogged, completion: str) -> float:
    """scale / (scale + |len - target_chars|), optionally averaged with a charset fraction.

    A hyperbola rather than a hard window so every extra char still moves the reward.
    """
    target = _param_float(interaction, "target_chars", 0.0)
    scale = _param_float(interaction, "scale", 8.0)
    if target < 0 or scale <= 0:
        raise PoisonEventError("task_params need target_chars >= 0 and scale > 0")
    score = scale / (scale + abs(len(completion) - target))
    charset = interaction.task_params.get("charset")
    if charset is None:
        return score
    check = CHARSETS.get(str(charset))
    if check is None:
        raise PoisonEventError(f"unknown charset {charset!r}; known: {', '.join(CHARSETS)}")
    fraction = sum(check(c) for c in completion) / len(completion) if completion else 0.0
    return 0.5 * score + 0.5 * fraction


@declare(version=2, inline=True)
def feedback_reward(interaction: InteractionLogged, completion: str) -> float:
    """feedback x similarity to the rated response: be like what users liked, unlike the rest.

    v2 uses the graded similarity of `reference` instead of v1's exact-match ratio (difflib),
    which gave a random start almost no signal: a policy could not learn from feedback alone.
    """
    if interaction.response is None or interaction.feedback is None:
        raise PoisonEventError("task 'feedback' needs 'response' and 'feedback' fields")
    return interaction.feedback * graded_similarity(completion, interaction.response)


REWARD_FUNCTIONS: dict[str, tuple[RewardFn, int]] = {
    fn.__name__.removesuffix("_reward"): (fn, fn.version)  # type: ignore[attr-defined]
    for fn in (reference_reward, length_reward, feedback_reward)
}
"""The built-ins with their declared versions (what `score_completions` scores with)."""


def score_completions(
    interaction: InteractionLogged, completions: list[str]
) -> tuple[list[float], str, int]:
    """Score a group with a built-in; any problem is the event's fault, so it is a poison
    event, not a retry. The stages score through `workers.rewards.registry.Rewards`, which
    also knows plugins and HTTP judges."""
    entry = REWARD_FUNCTIONS.get(interaction.task)
    if entry is None:
        known = ", ".join(sorted(REWARD_FUNCTIONS))
        raise PoisonEventError(f"unknown reward function {interaction.task!r}; known: {known}")
    fn, version = entry
    rewards = [float(fn(interaction, c)) for c in completions]
    if not all(math.isfinite(r) for r in rewards):
        raise PoisonEventError(f"reward function {interaction.task!r} returned a non-finite reward")
    return rewards, interaction.task, version
