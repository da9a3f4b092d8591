"""The architecture registry: targets by group, peft/SGLang export fields, clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    Phi3Config,
    PretrainedConfig,
)

from workers.models import registry
from workers.models.registry import (
    BadTargets,
    UnsupportedArchitecture,
    family_of,
    parse_targets,
    resolve,
)
from workers.models.tiny import tiny_config


def _meta(config: PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_parse_targets() -> None:
    assert parse_targets("all") == ("attn", "mlp", "shared", "experts")
    assert parse_targets(" attn, q_proj ,attn") == ("attn", "q_proj")
    with pytest.raises(BadTargets):
        parse_targets(" , ")


@pytest.mark.parametrize("config", [
    GPT2Config(n_layer=1, n_embd=16, n_head=2),
    FalconConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2),
    Phi3Config(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
               intermediate_size=32),
], ids=["gpt2", "falcon", "phi3"])
def test_unsupported_architectures_are_named_with_what_is_supported(
        config: PretrainedConfig) -> None:
    with pytest.raises(UnsupportedArchitecture) as err:
        family_of(config)
    message = str(err.value)
    assert repr(config.model_type) in message
    assert "supported model types: llama, qwen3, mixtral" in message


def test_deepseek_groups_and_peft_fields() -> None:
    model = _meta(tiny_config("deepseek_v3", hidden_size=32))
    targets = resolve(model, "all")
    assert targets.groups() == {"attn": 10, "mlp": 3, "shared": 3, "experts": 1}
    fields = targets.peft_fields()
    # peft#3711: the 2-D MLP linears are target_parameters, never target_modules
    assert fields["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj",
                                        "q_b_proj"]
    assert fields["target_parameters"] == ["down_proj.weight", "gate_proj.weight",
                                           "up_proj.weight", "experts.gate_up_proj",
                                           "experts.down_proj"]
    shared_only = resolve(model, "shared").peft_fields()  # a partial selection: full names
    assert shared_only["target_parameters"] == [
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight"]
    assert targets.sglang_target_modules() == sorted(
        ["down_proj", "gate_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj",
         "q_b_proj", "up_proj"])
    assert targets.needs_serving_layout


def test_dense_targets_and_leaf_names() -> None:
    model = _meta(tiny_config("llama", hidden_size=32))
    fields = resolve(model, ("attn", "mlp", "shared", "experts")).peft_fields()
    assert fields == {"target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                         "up_proj", "v_proj"]}
    assert resolve(model, "q_proj,v_proj").linear_names == (
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    assert not resolve(model, "attn").needs_serving_layout


@pytest.mark.parametrize(("arch", "spec", "reason"), [
    ("llama", "experts", "select nothing"),
    ("llama", "attn,c_attn", "c_attn"),
    ("mixtral", "gate", "stay frozen"),
    ("deepseek_v32", "wq_b", "stay frozen"),
])
def test_bad_targets_are_refused(arch: str, spec: str, reason: str) -> None:
    with pytest.raises(BadTargets, match=reason):
        resolve(_meta(tiny_config(arch, hidden_size=32)), spec)


def test_every_family_has_a_tiny_base() -> None:
    from workers.models.tiny import ARCHES

    assert set(ARCHES) == set(registry.FAMILIES)
