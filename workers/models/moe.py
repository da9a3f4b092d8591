"""A tiny local Mixtral-style MoE base (fused 3-D expert weights) and its PEFT export config.

transformers 5 stores a Mixtral layer's experts as two fused Parameters, `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I], not as per-expert nn.Linear, so LoRA on experts means
peft's `target_parameters` (peft >= 0.17); `workers.training.multilora` wraps these stacks and
exports in exactly that format. Built from code like the tiny Llama, so tests never download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from workers.artifacts.store import adapter_config
from workers.models.base import LoraSpec, _char_tokenizer, build_model_dir
from workers.training.multilora import MultiLora


def _tiny_moe(seed: int, hidden_size: int, num_layers: int, experts: int) -> MixtralForCausalLM:
    tokenizer = _char_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=256,
        initializer_range=0.05, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(config)


def build_tiny_moe_model(out_dir: Path, *, seed: int = 0, hidden_size: int = 32,
                         num_layers: int = 2, experts: int = 4) -> Path:
    """Build (once) a tiny random Mixtral with the char tokenizer in `out_dir` (atomic rename)."""

    def write(tmp: Path) -> None:
        _tiny_moe(seed, hidden_size, num_layers, experts).save_pretrained(tmp)
        _char_tokenizer().save_pretrained(tmp)

    return build_model_dir(out_dir, write)


def multilora_adapter_config(lora: LoraSpec, base_model: str, multi: MultiLora) -> dict[str, Any]:
    """`adapter_config` plus `target_parameters` when the base has fused experts, so the
    exported revision reloads with `PeftModel.from_pretrained` with LoRA on every expert."""
    config = adapter_config(lora, base_model)
    targets = multi.target_parameters()
    if targets:
        config["target_parameters"] = targets
    return config
