"""SFT and DPO beside GRPO in the multi-policy trainer: the losses by hand in float64, a joint
step of policies with different objectives (and per-policy rank, learning rate and targets)
equals their separate steps, and a policy targeting attention only exports a peft adapter with
the same logits. TRL's trainers as the oracle: `test_objectives_trl.py`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from schemas.errors import PoisonEventError
from tests.support.objectives import dpo_group, sft_group, tokens
from workers.artifacts.store import ArtifactStore, adapter_config
from workers.models.base import LoraSpec, load_base_model
from workers.pipeline.configs import expand_targets
from workers.training.grpo import StepResult, TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer
from workers.training.objectives import dpo_loss, order_groups, sft_loss
from workers.training.perpolicy import PolicyTraining


def test_sft_loss_is_the_mean_nll_of_completion_tokens() -> None:
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-3.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    assert sft_loss(logp, mask).item() == pytest.approx((1.0 + 2.0 + 3.0) / 3)


def test_dpo_loss_by_hand() -> None:
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -3.0], [-0.5, -0.5], [-0.2, -0.1]],
                        dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-2.0, -2.0], [-0.5, -1.0], [-0.3, -0.1]],
                       dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]], dtype=torch.float64)
    beta = 0.3
    loss = dpo_loss(logp, ref, mask, beta)
    # pair 1: chosen ratio (-2) - (-2.5) = 0.5, rejected (-5) - (-4) = -1 -> margin 1.5
    # pair 2: chosen ratio (-0.5) - (-1.0) = 0.5, rejected (-0.3) - (-0.4) = 0.1 -> margin 0.4
    want = (-math.log(1 / (1 + math.exp(-beta * 1.5)))
            - math.log(1 / (1 + math.exp(-beta * 0.4)))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert logp.grad is not None
    s1 = 1 / (1 + math.exp(beta * 1.5))  # d/d(margin) of -logsigmoid(beta m) is -beta*sig(-bm)
    assert logp.grad[0, 0].item() == pytest.approx(-beta * s1 / 2)
    assert logp.grad[1, 0].item() == pytest.approx(beta * s1 / 2)
    assert logp.grad[2, 0].item() == 0.0  # masked prompt position


def test_groups_are_ordered_by_objective_and_dpo_groups_are_pairs() -> None:
    g = TrainGroup([1], [[2]], [[0.0]], [1.0])
    sft = TrainGroup([1], [[2], [3]], [[0.0], [0.0]], [1.0, 1.0], objective="sft")
    dpo = TrainGroup([1], [[2], [3]], [[0.0], [0.0]], [1.0, 0.0], objective="dpo")
    ordered, parts = order_groups([dpo, g, sft, g])
    assert ordered == [g, g, sft, dpo]
    assert [(p.objective, p.start, p.end) for p in parts] == [
        ("grpo", 0, 2), ("sft", 2, 4), ("dpo", 4, 6)]
    with pytest.raises(PoisonEventError, match="pair"):
        order_groups([TrainGroup([1], [[2]], [[0.0]], [1.0], objective="dpo")])
    with pytest.raises(PoisonEventError, match="unknown objective"):
        order_groups([TrainGroup([1], [[2]], [[0.0]], [1.0], objective="ppo")])


def _work(trainer: MultiPolicyTrainer) -> dict[str, list[TrainGroup]]:
    """A GRPO policy (sampled groups), an SFT policy (targets) and a DPO policy (pairs), one
    with a GRPO group mixed in."""
    prompts = [tokens(trainer.tokenizer, p) for p in ("What is 2+2?", "Say hi", "ok")]
    sampled = trainer.sample_many([(p, None, 4) for p in prompts], max_new_tokens=5, seed=3)
    grpo = [TrainGroup(p, [c.token_ids for c in g], [c.logprobs for c in g],
                       [len(c.token_ids) + 0.1 * k for k, c in enumerate(g)])
            for p, g in zip(prompts, sampled, strict=True)]
    tok = trainer.tokenizer
    sft = [sft_group(tok, p, t) for p, t in zip(prompts, ("4", "hi", "yes yes"), strict=True)]
    dpo = [dpo_group(tok, p, c, r) for p, c, r in
           zip(prompts, ("4", "hi", "k"), ("five", "go away", "no no no"), strict=True)]
    return {"g": grpo, "s": sft, "d": [*dpo, grpo[0]]}


TRAINING = {
    "g": PolicyTraining(LoraSpec(rank=2, alpha=4.0), lr=3e-2, kl_beta=0.05),
    "s": PolicyTraining(LoraSpec(rank=1, alpha=8.0, target_modules=expand_targets(["attn"])),
                        lr=5e-2),
    "d": PolicyTraining(LoraSpec(rank=4, alpha=8.0), lr=2e-2, dpo_beta=0.2),
}


def _configured(path: Path, **kw: object) -> MultiPolicyTrainer:
    trainer = MultiPolicyTrainer(path, LoraSpec(), dtype=torch.float64, **kw)  # type: ignore[arg-type]
    for policy, training in TRAINING.items():
        trainer.configure(policy, training)
    return trainer


@pytest.mark.parametrize("budget", [None, 0.0])
def test_joint_step_of_different_objectives_equals_separate_steps(tiny_model_dir: Path,
                                                                  budget: float | None) -> None:
    joint = _configured(tiny_model_dir, pass_activation_mb=budget)
    alone = _configured(tiny_model_dir)
    work = _work(alone)
    for _ in range(3):  # later steps: B != 0, so the policy differs from the DPO reference
        together = joint.step_many(work)
        for policy, groups in work.items():
            got, want = together[policy], alone.step(policy, groups)
            assert isinstance(got, StepResult)
            assert (got.step, got.tokens) == (want.step, want.tokens)
            assert got.loss == pytest.approx(want.loss, rel=1e-9, abs=1e-12)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-9)
            for k, v in joint.adapter_state(policy).items():
                torch.testing.assert_close(v, alone.adapter_state(policy)[k], rtol=0, atol=1e-12)
    assert together["g"].kl > 0  # type: ignore[union-attr]
    assert together["d"].loss != pytest.approx(math.log(2))  # type: ignore[union-attr]
    shapes = {k: tuple(v.shape) for k, v in joint.adapter_state("s").items()}
    assert all(".self_attn." in k for k in shapes) and len(shapes) == 2 * 4 * 2  # 2 layers
    assert {s[0] for k, s in shapes.items() if k.endswith("lora_A.weight")} == {1}


def test_sft_and_dpo_steps_learn_their_targets(tiny_model_dir: Path) -> None:
    trainer = _configured(tiny_model_dir)
    work = _work(trainer)
    losses: dict[str, list[float]] = {p: [] for p in ("s", "d")}
    for _ in range(8):
        out = trainer.step_many({p: work[p] for p in losses})
        for p in losses:
            losses[p].append(out[p].loss)  # type: ignore[union-attr]
    assert losses["s"][-1] < 0.8 * losses["s"][0]
    assert losses["d"][-1] < losses["d"][0]


def test_a_subset_of_targets_exports_a_peft_adapter_with_the_same_logits(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = _configured(tiny_model_dir)
    work = _work(trainer)
    for _ in range(2):
        trainer.step_many({"s": work["s"], "d": work["d"]})
    lora = TRAINING["s"].lora
    ref = ArtifactStore(tmp_path).put_adapter(trainer.adapter_state("s"), adapter_config(lora, "t"))
    base, _ = load_base_model(tiny_model_dir)
    ids = torch.tensor([tokens(trainer.tokenizer, "hello there")])
    with torch.no_grad():
        want = PeftModel.from_pretrained(base.double(), ref.path)(input_ids=ids).logits
    torch.testing.assert_close(trainer.logits("s", ids), want.float(), rtol=1e-5, atol=1e-5)
    copy = _configured(tiny_model_dir)
    copy.load_adapter_weights("s", trainer.adapter_state("s"), step=2)  # exports are float32
    torch.testing.assert_close(copy.logits("s", ids), trainer.logits("s", ids), rtol=0, atol=1e-5)
    with pytest.raises(PoisonEventError, match="does not target"):
        copy.load_adapter_weights("s", trainer.adapter_state("d"))


def test_configure_changes_lr_in_place_and_a_new_shape_restarts_the_adapter(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = _configured(tiny_model_dir)
    work = _work(trainer)
    trainer.step_many({"s": work["s"]})
    trainer.save_checkpoint("s", tmp_path)
    trainer.configure("s", PolicyTraining(TRAINING["s"].lora, lr=1e-3))
    assert trainer._policies["s"].optimizer.param_groups[0]["lr"] == 1e-3
    wider = PolicyTraining(LoraSpec(rank=3, alpha=8.0), lr=1e-3)
    trainer.configure("s", wider)
    assert trainer.steps_done("s") == 1
    state = trainer.adapter_state("s")
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith("lora_B.weight"))
    resumed = _configured(tiny_model_dir)
    resumed.load_checkpoint("s", tmp_path)  # the checkpoint of its own (attention-only) shape
    assert resumed.steps_done("s") == 1
