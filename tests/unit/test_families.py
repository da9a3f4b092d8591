"""Every registry family end to end on a tiny base built from its transformers config.

For each: the multi-policy layer matches peft in float64 (ranks 1 and 8 and a base row in one
pass, logits and gradients), a training step leaves every base parameter and buffer
bit-identical, the export reloads with plain `PeftModel.from_pretrained` to the trainer's logits,
and the CPU engine serves it with the trainer's log-probs on a mixed-adapter batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from workers.models.base import load_base_model
from workers.models.dsa import stabilize_indexers
from workers.models.registry import prepare
from workers.models.tiny import ARCHES, build_tiny, tiny_config, tiny_model
from workers.reference.families import engine_error, oracle_error, reload_error, train_two
from workers.training.multilora import MultiLora


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _base(root: Path, arch: str) -> Path:
    return build_tiny(arch, root / arch, hidden_size=32)


@pytest.mark.parametrize("arch", ARCHES)
def test_multilora_matches_peft_in_float64(family_root: Path, arch: str) -> None:
    assert oracle_error(_base(family_root, arch)) <= 1e-6


@pytest.mark.parametrize("arch", ARCHES)
def test_step_freezes_base_export_reloads_and_engine_serves(family_root: Path,
                                                            arch: str) -> None:
    base = _base(family_root, arch)
    trainer, frozen, _ = train_two(base, steps=1)
    assert frozen  # routers, expert biases, sinks, indexers, norms: bit-identical
    trainable = {n for n, p in trainer.base.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([list(trainer.tokenizer("count to three")["input_ids"])])
    plain, _ = load_base_model(base)
    prepare(plain)
    with torch.no_grad():
        assert not torch.allclose(trainer.logits("a", ids), plain(input_ids=ids).logits,
                                  atol=1e-4)  # the step moved the adapter
    assert reload_error(trainer, base) <= 1e-5
    assert engine_error(trainer, base) <= 1e-5


def test_peft_rewrites_naive_mlp_targets_on_deepseek(family_root: Path, tmp_path: Path) -> None:
    """Pins peft#3711 (0.21.2): `gate_proj`/`up_proj`/`down_proj` in `target_modules` of a
    DeepSeek base are silently turned into fused-expert targets at rank 2r, so the export no
    longer reloads; the registry's config (`target_parameters`) does."""
    base = _base(family_root, "deepseek_v3")
    model, _ = load_base_model(base)
    multi = MultiLora.install(model, ("attn", "mlp", "shared", "experts"))
    multi.add_slot(0, 4, 8.0, torch.Generator().manual_seed(0))
    adapter = tmp_path / "naive"
    adapter.mkdir()
    safetensors.torch.save_file(multi.export(0), str(adapter / "adapter_model.safetensors"))
    naive = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": [
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
        "up_proj", "down_proj"], "target_parameters": ["experts.gate_up_proj",
                                                       "experts.down_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(naive))
    fresh, _ = load_base_model(base)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(fresh, str(adapter))


def _prefill_gap(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Largest gap between a prefix's last logits and the full forward's at that position."""
    gap = 0.0
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        for n in range(5, ids.shape[1]):
            part = model(input_ids=ids[:, :n], use_cache=True).logits[0, -1]
            gap = max(gap, float((part - full[n - 1]).abs().max()))
    return gap


@pytest.mark.parametrize("arch", ["deepseek_v32", "glm_moe_dsa"])
def test_dsa_topk_ties_make_prefill_and_forward_disagree_unless_stable(arch: str) -> None:
    """The DSA indexer's ReLU scores tie at exactly 0 and torch.topk breaks ties by row length,
    so a prefill and a longer forward select different keys (a sampler/trainer log-prob
    mismatch); the registry's tie-stable top-k makes them agree."""
    config = tiny_config(arch, hidden_size=32)
    config._experts_implementation = "eager"
    worst_stock, worst_stable = 0.0, 0.0
    for seed in range(4):
        model = tiny_model(config, seed).double().eval()
        ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(seed))
        worst_stock = max(worst_stock, _prefill_gap(model, ids))
        assert stabilize_indexers(model) == config.num_hidden_layers
        worst_stable = max(worst_stable, _prefill_gap(model, ids))
    assert worst_stock > 1e-3
    assert worst_stable < 1e-6  # what remains is the float32 routers' rounding
