"""The SGLang-layout export of MoE adapters: per-expert 2-D keys SGLang loads, exact.

peft cannot be the oracle for DeepSeek-family per-expert keys (its v5 conversion drops the
shared and dense MLP LoRA), so the layout is checked by merging every B A into a float64 copy of
the base; the CPU engine must read it into exactly the slot bytes of the peft layout; for
Qwen3-MoE peft's own conversion of per-expert keys must reload it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from workers.models.base import load_base_model
from workers.models.tiny import build_tiny
from workers.reference.families import random_slot, sglang_merge_error
from workers.serving.sampler import SlotSampler

MOE = ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sglang")


@pytest.mark.parametrize("arch", MOE)
def test_per_expert_layout_merges_exactly_and_fills_the_same_engine_slot(
        root: Path, tmp_path: Path, arch: str) -> None:
    base = build_tiny(arch, root / arch, hidden_size=32)
    err, layout = sglang_merge_error(base, tmp_path)
    assert err <= 1e-8
    config = json.loads((layout / "adapter_config.json").read_text())
    assert "target_parameters" not in config and "rank_pattern" not in config
    assert {"gate_proj", "up_proj", "down_proj"} <= set(config["target_modules"])
    names = set(safetensors.torch.load_file(str(layout / "adapter_model.safetensors")))
    assert any(".experts.3.up_proj.lora_B.weight" in k for k in names)
    assert not any("base_layer" in k for k in names)
    sampler = SlotSampler(base, num_slots=2, max_rank=8)
    sampler.load(0, tmp_path / "peft")
    sampler.load(1, layout)
    assert torch.equal(sampler.slots.storage[0], sampler.slots.storage[1])


def test_qwen3_moe_per_expert_layout_reloads_through_peft_conversion(root: Path,
                                                                     tmp_path: Path) -> None:
    base = build_tiny("qwen3_moe", root / "qwen3_moe", hidden_size=32)
    _, layout = sglang_merge_error(base, tmp_path)
    model, multi = random_slot(base)  # the same seeded factors sglang_merge_error exported
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), multi.route([0, 0]):
        want = model(input_ids=ids).logits.float()
    plain, _ = load_base_model(base)
    with torch.no_grad():
        bare = plain(input_ids=ids).logits.clone()
    reloaded = PeftModel.from_pretrained(plain, str(layout))
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, bare, atol=1e-3)


def test_ensure_layout_writes_once(root: Path, tmp_path: Path) -> None:
    from workers.serving.sglang_layout import ensure_sglang_layout

    base = build_tiny("mixtral", root / "mixtral", hidden_size=32)
    sglang_merge_error(base, tmp_path)
    out = ensure_sglang_layout(tmp_path / "peft", tmp_path / "derived" / "x", base)
    first = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert ensure_sglang_layout(tmp_path / "peft", out, base) == out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == first
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
