from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from schemas.events import InteractionLogged
from tests.unit.test_engine import export_random_adapter
from workers.pipeline.evaluate import evaluate_adapter
from workers.reference.sampler import LocalEngine
from workers.rewards.functions import score_completions
from workers.serving.sampling import Sampler

HELDOUT = [
    InteractionLogged(policy_id="p", prompt="2+2=", task="reference", reference="4",
                      split="eval"),
    InteractionLogged(policy_id="p", prompt="Say hi", task="reference", reference="hi",
                      split="eval"),
]


def test_evaluate_is_the_mean_reward_and_reproducible(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    local = LocalEngine(tiny_model_dir)
    local.load_adapter("cand", export_random_adapter(tiny_model_dir, tmp_path / "a", 0))
    # evaluate_adapter only encodes and generates; LocalEngine lacks the stage's ensure_adapter.
    engine = cast(Sampler, local)
    base = evaluate_adapter(engine, None, HELDOUT, max_new_tokens=8, samples=3, seed=4)
    assert base == evaluate_adapter(engine, None, HELDOUT, max_new_tokens=8, samples=3, seed=4)
    groups = engine.generate([i.prompt for i in HELDOUT], None, n=3, max_new_tokens=8, seed=4)
    rewards = [r for i, g in zip(HELDOUT, groups, strict=True)
               for r in score_completions(i, [s.text for s in g])[0]]
    assert base == pytest.approx(sum(rewards) / len(rewards))
    cand = evaluate_adapter(engine, "cand", HELDOUT, max_new_tokens=8, samples=3, seed=4)
    assert 0.0 <= cand <= 1.0 and cand != base
    with pytest.raises(ValueError):
        evaluate_adapter(engine, None, [], max_new_tokens=8)
