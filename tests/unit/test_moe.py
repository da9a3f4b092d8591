"""LoRA on the fused experts of a tiny Mixtral: peft oracle, multi-policy training, export."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from workers.artifacts.store import ArtifactStore
from workers.models.base import LoraSpec, load_base_model
from workers.models.moe import build_tiny_moe_model, multilora_adapter_config
from workers.training.grpo import StepResult, TrainGroup
from workers.training.multilora import MultiLora, MultiLoraExperts, MultiLoraLinear
from workers.training.multitrainer import MultiPolicyTrainer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_moe_model(tmp_path_factory.mktemp("moe") / "tiny-moe")


def _load64(path: Path) -> torch.nn.Module:
    base, _ = load_base_model(path)
    base.config._experts_implementation = "eager"  # the oracle's experts: plain per-expert loop
    return base.double()


def test_mixed_batch_matches_peft_on_experts(moe_dir: Path) -> None:
    """Several policies (ranks 1 and 8) in one pass vs peft's per-adapter passes, float64."""
    ranks, row_adapters = [1, 8], [0, 1, 1, 0]
    torch.manual_seed(0)
    oracle: peft.PeftModel | None = None
    for i, r in enumerate(ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ATTN),
                                 target_parameters=EXPERT_TARGETS, init_lora_weights=False)
        if oracle is None:
            oracle = peft.get_peft_model(_load64(moe_dir), config, adapter_name="a0")
        else:
            oracle.add_adapter(f"a{i}", config)
    assert oracle is not None
    oracle.double()
    ids = torch.randint(4, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(4, 7, oracle.config.vocab_size, dtype=torch.float64)
    want_logits, want_grads, states = torch.zeros_like(weights), {}, {}
    for i in range(len(ranks)):
        oracle.set_adapter(f"a{i}")
        rows = [j for j, a in enumerate(row_adapters) if a == i]
        out = oracle(input_ids=ids[rows]).logits
        (out * weights[rows]).sum().backward()
        want_logits[rows] = out.detach()
        states[i] = get_peft_model_state_dict(oracle, adapter_name=f"a{i}")
        named = dict(oracle.named_parameters())
        want_grads[i] = {k: named[k.replace(".weight", f".a{i}.weight")].grad for k in states[i]}

    base = _load64(moe_dir)
    multi = MultiLora.install(base, ATTN)
    assert len(multi.experts) == 2 and multi.target_parameters() == EXPERT_TARGETS
    for i, r in enumerate(ranks):
        multi.add_slot(i, r, 2.0 * r)
        multi.load(i, states[i])
        assert multi.export(i).keys() == states[i].keys()
    with multi.route(row_adapters):
        logits = base(input_ids=ids).logits
        (logits * weights).sum().backward()
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)
    for i in range(len(ranks)):
        got = _grads_as_peft(multi, i)
        assert got.keys() == want_grads[i].keys()
        for key, grad in want_grads[i].items():
            # Mixtral's router takes its softmax in float32 by design, so gradient paths
            # through the routing weights carry float32 rounding even in a float64 model.
            torch.testing.assert_close(got[key], grad, rtol=1e-6, atol=1e-9)


def _grads_as_peft(multi: MultiLora, slot: int) -> dict[str, torch.Tensor]:
    """The slot's gradients laid out as its export (peft keys and shapes)."""
    layers: list[MultiLoraLinear | MultiLoraExperts] = [*multi.linears.values(),
                                                        *multi.experts.values()]
    params = [p for layer in layers
              for d in (layer.lora_A, layer.lora_B) for k, p in d.items() if k.endswith(f"s{slot}")]
    saved = [p.data for p in params]
    for p in params:
        assert p.grad is not None
        p.data = p.grad
    try:
        return {k: v.double() for k, v in multi.export(slot).items()}
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


def test_moe_policies_train_export_and_reload(moe_dir: Path, tmp_path: Path) -> None:
    trainer = MultiPolicyTrainer(moe_dir, LoraSpec(), lr=5e-2, kl_beta=0.05)
    prompts = [list(trainer.tokenizer(p)["input_ids"]) for p in ("hi?", "count")]
    for step in range(3):
        out = trainer.sample_many([(p, pol, 4) for pol in ("a", "b") for p in prompts],
                                  max_new_tokens=5, seed=step)
        groups = [TrainGroup(p, [c.token_ids for c in g], [c.logprobs for c in g],
                             [float(len(c.token_ids)) + 0.1 * k for k, c in enumerate(g)])
                  for p, g in zip(prompts * 2, out, strict=True)]
        results = trainer.step_many({"a": groups[:2], "b": groups[2:]})
        assert [r.step for r in results.values() if isinstance(r, StepResult)] == [step + 1] * 2
    state = trainer.adapter_state("a")
    expert_keys = [k for k in state if ".experts." in k and "lora_B" in k]
    assert len(expert_keys) == 4 and all(state[k].abs().max() > 0 for k in expert_keys)

    store = ArtifactStore(tmp_path)
    ids = torch.tensor([list(trainer.tokenizer("hello there")["input_ids"])])
    for policy in ("a", "b"):
        config = multilora_adapter_config(trainer.lora, str(moe_dir), trainer.multi)
        ref = store.put_adapter(trainer.adapter_state(policy), config)
        base, _ = load_base_model(moe_dir)
        with torch.no_grad():
            plain = base(input_ids=ids).logits.clone()
            reloaded = PeftModel.from_pretrained(base, ref.path)(input_ids=ids).logits
        got = trainer.logits(policy, ids)
        torch.testing.assert_close(got, reloaded, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-4)
