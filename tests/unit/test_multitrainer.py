"""MultiPolicyTrainer: a joint K-policy step equals K separate steps, isolation, resume, export,
and mixed-policy sampling from the live adapters."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from schemas.errors import PoisonEventError, TrainingRejected
from tests.support.float64 import llama_in_input_precision
from workers.artifacts.store import ArtifactStore, adapter_config
from workers.models.base import LoraSpec, load_base_model
from workers.reference.trainer import PolicyTrainer
from workers.training.checkpoint import Checkpoint
from workers.training.grpo import StepResult, TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer

PROMPTS = {"a": ["What is 2+2?", "Say hi"], "b": ["Name a color"],
           "c": ["Count to three", "Why?", "ok"]}


_trainer = functools.partial(MultiPolicyTrainer, lora=LoraSpec())


def _groups(trainer: MultiPolicyTrainer, prompts: list[str], seed: int) -> list[TrainGroup]:
    """Base-model rollouts; rewards differ per completion (length, plus a tie-breaker)."""
    ids = [list(trainer.tokenizer(p)["input_ids"]) for p in prompts]
    out = trainer.sample_many([(i, None, 4) for i in ids], max_new_tokens=6, seed=seed)
    return [TrainGroup(i, [c.token_ids for c in g], [c.logprobs for c in g],
                       [len(c.token_ids) + 0.1 * k for k, c in enumerate(g)])
            for i, g in zip(ids, out, strict=True)]


def _work(trainer: MultiPolicyTrainer) -> dict[str, list[TrainGroup]]:
    return {p: _groups(trainer, prompts, seed=n) for n, (p, prompts) in enumerate(PROMPTS.items())}


def _same_state(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float) -> None:
    assert set(x) == set(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol)


def _close(a: StepResult, b: StepResult, rel: float) -> None:
    assert (a.step, a.tokens) == (b.step, b.tokens)
    assert a.mean_reward == pytest.approx(b.mean_reward)
    for f in ("loss", "kl", "grad_norm"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=rel, abs=1e-12)


@pytest.mark.parametrize(("checkpointing", "budget"),
                         [(False, None), (True, None), (False, 0.0), (True, 0.0)])
def test_joint_step_equals_separate_steps(tiny_model_dir: Path, checkpointing: bool,
                                          budget: float | None) -> None:
    """budget None: all policies in one mixed pass; 0.0: a pass per policy (accumulated)."""
    joint = _trainer(tiny_model_dir, dtype=torch.float64, kl_beta=0.05,
                     gradient_checkpointing=checkpointing, pass_activation_mb=budget)
    alone = _trainer(tiny_model_dir, dtype=torch.float64, kl_beta=0.05)
    work = _work(alone)
    assert len({sum(len(c) for g in w for c in g.completions) for w in work.values()}) == 3
    for _ in range(3):  # later steps: B != 0, Adam moments in play, ratios != 1
        together = joint.step_many(work)
        for policy, groups in work.items():
            got = together[policy]
            assert isinstance(got, StepResult)
            _close(got, alone.step(policy, groups), rel=1e-9)
            _same_state(joint.adapter_state(policy), alone.adapter_state(policy), atol=1e-12)
    a, b = joint.adapter_state("a"), joint.adapter_state("b")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # policies really differ


def _live_state(trainer: MultiPolicyTrainer | PolicyTrainer, policy: str
                ) -> dict[str, torch.Tensor]:
    """The policy's weights in the trainer's own dtype (`adapter_state` exports float32), by
    their export keys (the same order: layer order, A then B)."""
    params = trainer._policies[policy].params
    return dict(zip(trainer.adapter_state(policy), params, strict=True))


def test_matches_the_peft_policy_trainer(tiny_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Same init as PolicyTrainer (same seed and layer order), and the same step through peft,
    in float64: measured 1.5e-14 apart at most (weights ~0.1; float32 was 3e-6)."""
    llama_in_input_precision(monkeypatch)
    multi = _trainer(tiny_model_dir, dtype=torch.float64)
    peft_trainer = PolicyTrainer(tiny_model_dir, LoraSpec(), dtype=torch.float64)
    work = _work(multi)
    for policy in work:
        peft_trainer.step(policy, work[policy][:1])  # creates it; compare after one step each
    results = multi.step_many({p: w[:1] for p, w in work.items()})
    for policy in work:
        _same_state(_live_state(multi, policy), _live_state(peft_trainer, policy), atol=1e-12)
        got = results[policy]
        assert isinstance(got, StepResult) and got.step == 1


def test_absent_policy_does_not_move(tiny_model_dir: Path) -> None:
    trainer = _trainer(tiny_model_dir)
    work = _work(trainer)
    trainer.step_many(work)
    before = trainer.adapter_state("b")
    moments = {k: v.clone() for k, v in trainer._policies["b"].optimizer.state_dict()["state"][1]
               .items()}
    a_before = trainer.adapter_state("a")
    results = trainer.step_many({"a": work["a"], "c": work["c"]})
    assert set(results) == {"a", "c"} and trainer.steps_done("b") == 1
    _same_state(trainer.adapter_state("b"), before, atol=0)
    after = trainer._policies["b"].optimizer.state_dict()["state"][1]
    assert all(torch.equal(moments[k], after[k]) for k in moments)
    assert all(p.grad is None for p in trainer._policies["b"].params)
    assert any(not torch.equal(a_before[k], v) for k, v in trainer.adapter_state("a").items())


@pytest.mark.parametrize("budget", [None, 0.0])
def test_non_finite_policy_is_rejected_without_moving_others(tiny_model_dir: Path,
                                                             budget: float | None) -> None:
    joint = _trainer(tiny_model_dir, dtype=torch.float64, pass_activation_mb=budget)
    alone = _trainer(tiny_model_dir, dtype=torch.float64)
    work = _work(alone)
    for trainer in (joint, alone):
        trainer.step_many(work)
    b, c = work["b"], work["c"]
    nan_old = [TrainGroup(g.prompt_ids, g.completions, [[math.nan] * len(x) for x in
                                                         g.old_logprobs], g.rewards) for g in b]
    nan_reward = [TrainGroup(g.prompt_ids, g.completions, g.old_logprobs,
                             [math.inf, *g.rewards[1:]]) for g in c]
    poison = [TrainGroup([10**6], [[1]], [[0.0]], [1.0])]
    b_before = joint.adapter_state("b")
    results = joint.step_many({"a": work["a"], "b": nan_old, "c": nan_reward, "p": poison})
    assert isinstance(results["b"], TrainingRejected)
    assert isinstance(results["c"], TrainingRejected)
    assert isinstance(results["p"], PoisonEventError)
    assert (joint.steps_done("b"), joint.steps_done("c")) == (1, 1)
    _same_state(joint.adapter_state("b"), b_before, atol=0)
    expected, got = alone.step("a", work["a"]), results["a"]
    assert isinstance(got, StepResult)
    _close(got, expected, rel=1e-9)
    _same_state(joint.adapter_state("a"), alone.adapter_state("a"), atol=1e-12)
    with pytest.raises(TrainingRejected):
        joint.step("b", nan_old)


def test_checkpoint_resume_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    original = _trainer(tiny_model_dir, kl_beta=0.1)
    work = _work(original)
    for _ in range(2):
        original.step_many(work)
    for policy in work:
        original.save_checkpoint(policy, tmp_path / policy)
    expected = original.step_many(work)
    resumed = _trainer(tiny_model_dir, kl_beta=0.1)
    for policy in work:
        resumed.load_checkpoint(policy, tmp_path / policy)
        assert resumed.steps_done(policy) == 2
    got = resumed.step_many(work)
    assert got == expected
    for policy in work:
        _same_state(resumed.adapter_state(policy), original.adapter_state(policy), atol=0)
    with pytest.raises(PoisonEventError):
        MultiPolicyTrainer(tiny_model_dir, LoraSpec(rank=2)).load_checkpoint("a", tmp_path / "a")


def test_each_slot_exports_to_peft_with_the_same_logits(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    trainer = _trainer(tiny_model_dir)
    work = _work(trainer)
    for _ in range(2):
        trainer.step_many(work)
    store = ArtifactStore(tmp_path)
    ids = torch.tensor([list(trainer.tokenizer("hello there")["input_ids"])])
    for policy in work:
        ref = store.put_adapter(trainer.adapter_state(policy), adapter_config(trainer.lora, "t"))
        base, _ = load_base_model(tiny_model_dir)
        with torch.no_grad():
            want = PeftModel.from_pretrained(base, ref.path)(input_ids=ids).logits
        torch.testing.assert_close(trainer.logits(policy, ids), want, rtol=1e-5, atol=1e-5)
    copy = _trainer(tiny_model_dir)
    copy.load_adapter_weights("x", trainer.adapter_state("a"), step=7)
    _same_state(copy.adapter_state("x"), trainer.adapter_state("a"), atol=0)
    assert copy.steps_done("x") == 7 and copy.has_policy("x")


def test_mixed_sampling_uses_each_rows_own_policy(tiny_model_dir: Path) -> None:
    """One pass samples a, b and the base; each row's log-probs are its own policy's (the rows
    of a request share its prefill's KV cache)."""
    trainer = _trainer(tiny_model_dir, dtype=torch.float64, temperature=0.8, lr=0.1)
    work = _work(trainer)
    for _ in range(3):
        trainer.step_many(work)
    prompt = list(trainer.tokenizer("Say hi")["input_ids"])
    out = trainer.sample_many([(prompt, "a", 3), ([prompt[0]], "b", 2), (prompt, None, 2)],
                              max_new_tokens=6, seed=0)
    assert [len(x) for x in out] == [3, 2, 2]
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # one shared prefill, own draws per row
    for (p, policy), completions in zip([(prompt, "a"), ([prompt[0]], "b"), (prompt, None)],
                                        out, strict=True):
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) and c.token_ids
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad(), trainer.multi.route(
                    [None if policy is None else trainer.slot_of(policy)]):
                logits = trainer.base(input_ids=ids).logits[0, len(p) - 1:-1]
            lp = torch.log_softmax(logits / 0.8, -1).gather(-1, ids[0, len(p):, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), lp,
                                       rtol=1e-9, atol=1e-9)


def test_checkpoint_of_other_parameter_shapes_is_refused_before_anything_changes() -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    optimizer = torch.optim.AdamW(params)
    ckpt = Checkpoint({"shapes": [[3, 2]], "param_groups": []}, {}, {})
    with pytest.raises(PoisonEventError, match="other parameter shapes"):
        ckpt.restore_optimizer(optimizer, params)
    assert optimizer.state_dict()["state"] == {}
