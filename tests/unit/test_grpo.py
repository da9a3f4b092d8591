from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from schemas.errors import TrainingRejected
from schemas.events import InteractionLogged
from workers.artifacts.store import ArtifactStore, adapter_config
from workers.models.base import LoraSpec
from workers.reference.sampler import LocalEngine
from workers.reference.trainer import PolicyTrainer
from workers.rewards.functions import score_completions
from workers.training.grpo import (
    TrainGroup,
    group_advantages,
    grpo_loss,
    token_logps,
)

PROMPTS = ["What is 2+2?", "Say hi", "Name a color", "Count to three"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LocalEngine:
    return LocalEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def groups(engine: LocalEngine) -> list[TrainGroup]:
    """Real base-model rollouts with distinct rewards (length of the token list)."""
    out = engine.generate(PROMPTS[:2], None, n=6, max_new_tokens=8, seed=0)
    return [
        TrainGroup(engine.encode(p), [s.token_ids for s in g], [s.logprobs for s in g],
                   [float(i) for i in range(len(g))])
        for p, g in zip(PROMPTS, out, strict=False)
    ]


def make_trainer(tiny_model_dir: Path, kl_beta: float = 0.0) -> PolicyTrainer:
    return PolicyTrainer(tiny_model_dir, LoraSpec(), kl_beta=kl_beta)


def test_group_advantages() -> None:
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]))
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)])
    assert group_advantages(torch.tensor([0.5, 0.5, 0.5])).abs().max() == 0
    assert group_advantages(torch.tensor([2.0])).tolist() == [0.0]


def test_token_logps_alignment() -> None:
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    out = token_logps(logits, ids, mask, temperature=2.0)
    lp = torch.log_softmax(logits / 2.0, -1)
    assert out[0].tolist() == pytest.approx([0.0, lp[0, 1, 3].item(), lp[0, 2, 4].item()])


def test_loss_has_zero_gradient_for_equal_rewards() -> None:
    logp = torch.randn(3, 5, requires_grad=True)
    old = logp.detach() + 0.1
    loss = grpo_loss(logp, old, None, group_advantages(torch.ones(3)), torch.ones(3, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert logp.grad is not None and logp.grad.abs().max() == 0


def test_loss_on_policy_is_reinforce_and_clips() -> None:
    logp = torch.zeros(2, 3, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    grpo_loss(logp, logp.detach(), None, adv, mask).backward()
    expected = -(adv[:, None] * mask) / mask.sum()
    assert logp.grad is not None and torch.allclose(logp.grad, expected)
    # ratio e^1 > 1.2 with a positive advantage: clipped, no gradient
    high = torch.zeros(1, 2, requires_grad=True)
    grpo_loss(high, high.detach() - 1.0, None, torch.tensor([1.0]), torch.ones(1, 2)).backward()
    assert high.grad is not None and high.grad.abs().max() == 0


def test_k3_kl_term() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    loss = grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 2), beta=0.5)
    d = -0.5
    assert loss.item() == pytest.approx(0.5 * (math.exp(d) - d - 1) / 2)


def test_step_moves_only_the_stepped_policy(tiny_model_dir: Path,
                                            groups: list[TrainGroup]) -> None:
    trainer = make_trainer(tiny_model_dir)
    trainer.step("a", groups)
    trainer.step("b", groups)
    a_before, b_before = trainer.adapter_state("a"), trainer.adapter_state("b")
    result = trainer.step("a", groups)
    assert (result.step, trainer.steps_done("a"), trainer.steps_done("b")) == (2, 2, 1)
    assert result.tokens == sum(len(c) for g in groups for c in g.completions)
    assert math.isfinite(result.loss) and result.grad_norm > 0
    b_after, a_after = trainer.adapter_state("b"), trainer.adapter_state("a")
    assert all(torch.equal(b_before[k], b_after[k]) for k in b_before)
    assert any(not torch.equal(a_before[k], a_after[k]) for k in a_before)
    key = next(iter(a_after))
    assert key.startswith("base_model.model.model.layers.0.") and key.endswith("lora_A.weight")
    assert a_after[key].dtype == torch.float32 and a_after[key].is_contiguous()


def test_init_depends_on_seed_and_policy_not_order(tiny_model_dir: Path,
                                                   groups: list[TrainGroup]) -> None:
    flat = [TrainGroup(g.prompt_ids, g.completions, g.old_logprobs, [1.0] * len(g.rewards))
            for g in groups]
    t1, t2 = make_trainer(tiny_model_dir), make_trainer(tiny_model_dir)
    t1.step("x", flat)
    t1.step("y", flat)
    t2.step("y", flat)
    result = t2.step("y", flat)  # equal rewards: a valid, weight-preserving step
    assert result.loss == 0.0 and result.step == 2
    s1, s2, sx = t1.adapter_state("y"), t2.adapter_state("y"), t1.adapter_state("x")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], sx[k]) for k in s1)


def test_non_finite_is_rejected_and_changes_nothing(tiny_model_dir: Path,
                                                    groups: list[TrainGroup]) -> None:
    trainer = make_trainer(tiny_model_dir)
    trainer.step("a", groups)
    before = trainer.adapter_state("a")
    bad_reward = [TrainGroup(g.prompt_ids, g.completions, g.old_logprobs,
                             [math.nan, *g.rewards[1:]]) for g in groups]
    nan_old = [TrainGroup(g.prompt_ids, g.completions,
                          [[math.nan] * len(lp) for lp in g.old_logprobs], g.rewards)
               for g in groups]
    for bad in (bad_reward, nan_old):
        with pytest.raises(TrainingRejected):
            trainer.step("a", bad)
    assert trainer.steps_done("a") == 1
    after = trainer.adapter_state("a")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_resume_is_exact(tiny_model_dir: Path, groups: list[TrainGroup],
                                    tmp_path: Path) -> None:
    original = make_trainer(tiny_model_dir, kl_beta=0.1)
    original.step("a", groups)
    original.step("a", groups)
    original.save_checkpoint("a", tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors",
                                                             ".safetensors"]
    expected = original.step("a", groups)
    resumed = make_trainer(tiny_model_dir, kl_beta=0.1)
    resumed.load_checkpoint("a", tmp_path)
    assert resumed.steps_done("a") == 2
    got = resumed.step("a", groups)
    assert got == expected
    assert got.kl > 0
    s1, s2 = original.adapter_state("a"), resumed.adapter_state("a")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_load_adapter_weights(tiny_model_dir: Path, groups: list[TrainGroup]) -> None:
    trainer = make_trainer(tiny_model_dir)
    trainer.step("a", groups)
    trainer.load_adapter_weights("copy", trainer.adapter_state("a"), step=5)
    s1, s2 = trainer.adapter_state("a"), trainer.adapter_state("copy")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert trainer.steps_done("copy") == 5 and trainer.has_policy("copy")


def run_grpo(engine: LocalEngine, trainer: PolicyTrainer, store: ArtifactStore,
             interactions: list[InteractionLogged], steps: int) -> list[float]:
    """The pipeline's loop in-process: sample from the exported revision, score, step."""
    config, history = adapter_config(trainer.lora, "tiny"), []
    for step in range(steps):
        adapter = None
        if trainer.has_policy("p"):
            ref = store.put_adapter(trainer.adapter_state("p"), config)
            engine.load_adapter(ref.sha256, ref.path)
            adapter = ref.sha256
        out = engine.generate([i.prompt for i in interactions], adapter, n=6,
                              max_new_tokens=8, temperature=trainer.temperature, seed=step)
        batch, rewards = [], []
        for it, group in zip(interactions, out, strict=True):
            r, _, _ = score_completions(it, [s.text for s in group])
            rewards += r
            batch.append(TrainGroup(engine.encode(it.prompt), [s.token_ids for s in group],
                                    [s.logprobs for s in group], r))
        trainer.step("p", batch)
        history.append(sum(rewards) / len(rewards))
        if adapter:
            engine.unload_adapter(adapter)
    return history


@pytest.mark.parametrize(("task", "lr", "steps", "gain"),
                         [("length", 2e-2, 10, 0.3), ("reference", 1e-2, 30, 0.1)])
def test_grpo_learns(tiny_model_dir: Path, engine: LocalEngine, tmp_path: Path,
                     task: str, lr: float, steps: int, gain: float) -> None:
    refs = ["4", "hi", "red", "123"]
    interactions = [InteractionLogged(policy_id="p", prompt=p, task=task, reference=r)
                    for p, r in zip(PROMPTS, refs, strict=True)]
    trainer = PolicyTrainer(tiny_model_dir, LoraSpec(rank=4, alpha=8.0), lr=lr)
    history = run_grpo(engine, trainer, ArtifactStore(tmp_path), interactions, steps)
    first, last = history[0], sum(history[-5:]) / 5  # history[0]: the base model's samples
    print(f"{task}: base={first:.3f} last5={last:.3f}")
    assert last > first + gain
