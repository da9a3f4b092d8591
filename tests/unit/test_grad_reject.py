"""An exploding gradient (pre-clip norm above `max_grad_norm_reject`) rejects the step and
leaves the adapter untouched; clipping alone would have hidden the blow-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import TrainingRejected
from workers.models.base import LoraSpec
from workers.training.grpo import TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer

LORA = LoraSpec(rank=4, alpha=8.0)
GROUP = TrainGroup(prompt_ids=[5, 6, 7], completions=[[8, 9], [10]],
                   old_logprobs=[[-1.0, -1.2], [-0.5]], rewards=[1.0, 0.0])


def test_exploding_gradient_is_rejected(tiny_model_dir: Path) -> None:
    strict = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2, max_grad_norm_reject=1e-9)
    with pytest.raises(TrainingRejected, match=r"exploding gradient.*max_grad_norm_reject"):
        strict.step("p", [GROUP])
    assert strict.steps_done("p") == 0
    b = {k: v for k, v in strict.adapter_state("p").items() if "lora_B" in k}
    assert b and all(float(v.abs().max()) == 0.0 for v in b.values())  # still the init (B = 0)
    lenient = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2, max_grad_norm_reject=1e9)
    assert lenient.step("p", [GROUP]).step == 1
