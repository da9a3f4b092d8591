from __future__ import annotations

import math

import pytest

from schemas.errors import PoisonEventError
from schemas.events import InteractionLogged
from workers.rewards import functions as rewards
from workers.rewards.functions import score_completions


def interaction(**kw: object) -> InteractionLogged:
    return InteractionLogged.model_validate({"policy_id": "p", "prompt": "q", **kw})


def test_reference_graded() -> None:
    it = interaction(task="reference", reference="abc")
    scores, name, version = score_completions(it, ["abc", "", "abd", "abcdef", "ab", "!!!"])
    assert (name, version) == ("reference", 1)
    exact, empty, near, long, short, far = scores
    assert exact == pytest.approx(1.0)
    assert empty == pytest.approx(0.25 * 3 / 6)
    # 'd' is one codepoint from 'c': half credit, slightly less
    assert near == pytest.approx(0.75 * (2 + 0.5 * (1 - 1 / 32)) / 3 + 0.25)
    assert long == pytest.approx(0.75 + 0.25 * 3 / 6)
    assert short == pytest.approx(0.75 * 2 / 3 + 0.25 * 3 / 4)
    assert far < near < exact
    assert far == pytest.approx(0.25)  # "!" is > 32 codepoints away from a/b/c


def test_length_prefers_target() -> None:
    short = interaction(task="length")
    assert score_completions(short, ["", "abcd", "abcdefgh"])[0] == pytest.approx(
        [1.0, 8 / 12, 0.5])
    target = interaction(task="length", task_params={"target_chars": 4})
    assert score_completions(target, ["abcd", "ab", "abcdef"])[0] == pytest.approx(
        [1.0, 0.8, 0.8])


def test_length_charset_bonus() -> None:
    it = interaction(task="length", task_params={"target_chars": 2, "charset": "digits"})
    assert score_completions(it, ["12", "1a", "ab"])[0] == pytest.approx([1.0, 0.75, 0.5])
    bad = interaction(task="length", task_params={"charset": "emoji"})
    with pytest.raises(PoisonEventError, match="charset"):
        score_completions(bad, ["x"])


def test_feedback_sign_and_similarity() -> None:
    liked = interaction(task="feedback", response="hello", feedback=1.0)
    disliked = interaction(task="feedback", response="hello", feedback=-0.5)
    same, other, far = score_completions(liked, ["hello", "zzzzz", "~~~~~~~~~~"])[0]
    assert same == pytest.approx(1.0)
    assert 0.0 <= far < other < 0.5
    assert score_completions(disliked, ["hello"])[0] == [pytest.approx(-0.5)]
    part = score_completions(liked, ["help"])[0][0]
    assert 0.0 < part < 1.0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task": "nope"}, "unknown reward function 'nope'; known: feedback, length, reference"),
        ({"task": "reference"}, "reference"),
        ({"task": "feedback", "response": "x"}, "feedback"),
        ({"task": "feedback", "feedback": 1.0}, "response"),
        ({"task": "length", "task_params": {"target_chars": "x"}}, "number"),
    ],
)
def test_bad_events_are_poison(kw: dict[str, object], match: str) -> None:
    with pytest.raises(PoisonEventError, match=match):
        score_completions(interaction(**kw), ["abc"])


def test_non_finite_reward_is_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "nan", (lambda i, c: math.nan, 1))
    with pytest.raises(PoisonEventError, match="non-finite"):
        score_completions(interaction(task="nan"), ["abc"])
