"""SFT and DPO checked against TRL's own trainers in float64 (TRL 1.16, the `bench` extra).

Two levels. The loss math: TRL's `DPOTrainer._compute_loss` and `SFTTrainer.compute_loss`
run on given per-token log-probs (a stand-in model returns them) against
`workers.training.objectives` on the same numbers: same loss, same gradient. The whole step: a
peft model carrying the multi-policy trainer's adapter, with TRL's fused LM head and TRL's
reference (the adapter disabled), gives the loss the trainer reports for its step (to ~1e-7:
TRL's chunked LM head computes in float32 whatever the model's dtype).

TRL's trainers are called unbound on a stand-in `self` with only what the loss code reads, so
no dataset, accelerator or training loop is built. Skipped when TRL is not importable.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict

from tests.support.objectives import dpo_group, sft_group, tokens
from workers.models.base import LoraSpec, load_base_model
from workers.training.grpo import StepResult, TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer
from workers.training.objectives import dpo_loss, sft_loss
from workers.training.perpolicy import PolicyTraining

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer",
                                  reason="TRL is the oracle: install the bench extra")
sft_trainer = pytest.importorskip("trl.trainer.sft_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

F64 = torch.float64


class _Accelerator:
    device = torch.device("cpu")
    parallelism_config = None

    def gather_for_metrics(self, x: Any) -> Any:
        return x

    gather = gather_for_metrics

    def unwrap_model(self, model: Any) -> Any:
        return model


def _self(model: Any, **kw: Any) -> SimpleNamespace:
    """What TRL's loss code reads of its trainer."""
    base = {"model": model, "ref_model": None, "accelerator": _Accelerator(),
            "aux_loss_enabled": False, "_metrics": defaultdict(lambda: defaultdict(list)),
            "_total_train_tokens": 0, "_tp_size": 1}
    return SimpleNamespace(**{**base, **kw})


def _dpo_self(model: Any, beta: float, ref_model: Any = None,
              sft_weight: float = 0.0) -> SimpleNamespace:
    types, weights = (["sigmoid", "sft"], [1.0, sft_weight]) if sft_weight else (["sigmoid"],
                                                                                [1.0])
    return _self(model, ref_model=ref_model, ld_alpha=None, precompute_ref_logps=False,
                 f_divergence_type="reverse_kl", loss_types=types, loss_weights=weights,
                 beta=beta, label_smoothing=0.0, use_weighting=False,
                 args=SimpleNamespace(gradient_checkpointing_kwargs=None))


def _sft_self(model: Any) -> SimpleNamespace:
    return _self(model, compute_loss_func=None, label_smoother=None,
                 args=SimpleNamespace(loss_type="nll", average_tokens_across_devices=False))


class _Given(torch.nn.Module):
    """A stand-in model whose fused-head output is the given per-token log-probs."""

    def __init__(self, logp: torch.Tensor) -> None:
        super().__init__()
        self.logp = logp
        self.is_gradient_checkpointing = False
        self.eval()

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        zeros = torch.zeros_like(self.logp)
        return SimpleNamespace(log_probs=self.logp, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), label_mask=self.logp != 0, aux_loss=None)


def _masked(shape: tuple[int, int], completion: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=gen, dtype=F64) * 3 * completion


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_loss_and_gradient_match_trl(sft_weight: float) -> None:
    pairs, width = 3, 7
    completion = torch.zeros(2 * pairs, width + 1, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 6), (3, 5), (1, 8), (2, 4), (3, 8), (1, 3)]):
        completion[row, start:end] = 1  # TRL's layout: chosen rows, then rejected rows
    shifted = completion[:, 1:].to(F64)
    logp = _masked((2 * pairs, width), shifted, 0).requires_grad_()
    ref = _masked((2 * pairs, width), shifted, 1)
    ones = torch.ones_like(completion)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion}
    want = dpo_trainer.DPOTrainer._compute_loss(
        _dpo_self(_Given(logp), 0.25, _Given(ref), sft_weight), _Given(logp), inputs, False)
    (want_grad,) = torch.autograd.grad(want, logp)
    order = [i for k in range(pairs) for i in (k, pairs + k)]  # ours: chosen, rejected, ...
    ours_logp = logp.detach()[order].clone().requires_grad_()
    got = dpo_loss(ours_logp, ref[order], shifted[order], 0.25, sft_weight)
    (got_grad,) = torch.autograd.grad(got, ours_logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-14)
    # on completion tokens: elsewhere TRL's fused head gives constant zeros (no gradient)
    torch.testing.assert_close(got_grad, (want_grad * shifted)[order], rtol=1e-13, atol=1e-15)


def test_sft_loss_and_gradient_match_trl() -> None:
    completion = torch.zeros(4, 9, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 6), (3, 9), (1, 2), (4, 8)]):
        completion[row, start:end] = 1
    shifted = completion[:, 1:].to(F64)
    logp = _masked((4, 8), shifted, 2).requires_grad_()
    inputs = {"input_ids": torch.ones_like(completion)}
    want = sft_trainer.SFTTrainer.compute_loss(_sft_self(_Given(logp)), _Given(logp), inputs)
    (want_grad,) = torch.autograd.grad(want, logp)
    got = sft_loss(logp, shifted)
    (got_grad,) = torch.autograd.grad(got, logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-14)
    torch.testing.assert_close(got_grad, want_grad * shifted, rtol=1e-13, atol=1e-15)


# -- the trainer's whole step against TRL on a peft model ----------------------------------------
def _rows(groups: list[TrainGroup], order: list[int], pad: int) -> dict[str, torch.Tensor]:
    """TRL's batch: right-padded prompt+completion rows with a completion mask."""
    rows = [(g.prompt_ids, g.completions[i]) for i in order for g in groups] if order else [
        (g.prompt_ids, c) for g in groups for c in g.completions]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        attention[r, :len(p) + len(c)] = 1
        completion[r, len(p):len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _peft_copy(tiny: Path, trainer: MultiPolicyTrainer, policy: str, lora: LoraSpec) -> Any:
    base, _ = load_base_model(tiny)
    base = base.to(F64)  # type: ignore[arg-type]
    trl_utils.add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits",
                                               "is_top1"))
    model = get_peft_model(base, lora.peft_config(base))
    set_peft_model_state_dict(model, {k: v.to(F64) for k, v in
                                      trainer.adapter_state(policy).items()})
    model.eval()
    return model


@pytest.mark.parametrize(("objective", "sft_weight"), [("sft", 0.0), ("dpo", 0.0), ("dpo", 0.5)])
def test_the_trainers_step_loss_is_trls(tiny_model_dir: Path, objective: str,
                                        sft_weight: float) -> None:
    lora = LoraSpec(rank=2, alpha=8.0)
    trainer = MultiPolicyTrainer(tiny_model_dir, LoraSpec(), dtype=F64)
    trainer.configure("p", PolicyTraining(lora, lr=0.05, dpo_beta=0.3,
                                          dpo_sft_weight=sft_weight))
    tok = trainer.tokenizer
    prompts = [tokens(tok, p) for p in ("Say hi", "2+2?")]
    groups = ([sft_group(tok, p, t) for p, t in zip(prompts, ("hi", "four"), strict=True)]
              if objective == "sft" else
              [dpo_group(tok, p, c, r) for p, c, r in
               zip(prompts, ("hi", "4"), ("go away", "five"), strict=True)])
    trainer.step_many({"p": groups})  # a first step: the adapter is no longer the base
    model = _peft_copy(tiny_model_dir, trainer, "p", lora)
    pad = int(trainer.tokenizer.pad_token_id)
    if objective == "sft":
        inputs = _rows(groups, [], pad)
        labels = inputs["input_ids"].masked_fill(inputs.pop("completion_mask") == 0, -100)
        inputs.update(labels=labels)
        want = sft_trainer.SFTTrainer.compute_loss(_sft_self(model), model, inputs)
    else:
        inputs = _rows(groups, [0, 1], pad)
        want = dpo_trainer.DPOTrainer._compute_loss(_dpo_self(model, 0.3, None, sft_weight),
                                                    model, inputs, False)
    got = trainer.step_many({"p": groups})["p"]
    assert isinstance(got, StepResult)
    assert got.loss == pytest.approx(want.item(), rel=1e-6)  # TRL's fused head is float32
