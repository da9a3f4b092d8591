"""Tiny random bases of every registry family, built from their transformers configs.

Nothing downloads: each family's config class is instantiated with toy sizes (2 layers, hidden
64 by default, 4 experts with top-2 routing), seeded, and written with the real
`save_pretrained` next to the char tokenizer, so tests, benchmarks and `lorastream demo --arch`
load them through `from_pretrained` like any other base. Sizes: MLA ranks 16, rope/nope/v head
dims 8, one shared expert and a dense first layer for the DeepSeek family; an indexer with
`index_topk=4` for DSA (shorter than the pipeline's sequences, so its top-k really selects).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV32Config,
    GlmMoeDsaConfig,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from workers.models.base import _EOS_ROW_SCALE, _LM_HEAD_STD, _char_tokenizer, build_model_dir

_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _mla(hidden: int, experts: int) -> dict[str, Any]:
    return dict(intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                n_routed_experts=experts, num_experts_per_tok=2, q_lora_rank=16,
                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                num_key_value_heads=4, rope_parameters=dict(_DEFAULT_ROPE))


def _dsa(hidden: int, experts: int) -> dict[str, Any]:
    return dict(_mla(hidden, experts), index_topk=4, index_head_dim=16, index_n_heads=2)


_CONFIGS: dict[str, Callable[[int, int], tuple[type[PretrainedConfig], dict[str, Any]]]] = {
    "llama": lambda h, e: (LlamaConfig, dict(intermediate_size=2 * h)),
    "qwen3": lambda h, e: (Qwen3Config, dict(intermediate_size=2 * h, head_dim=h // 4)),
    "mixtral": lambda h, e: (MixtralConfig, dict(intermediate_size=h, num_local_experts=e,
                                                 num_experts_per_tok=2)),
    "qwen3_moe": lambda h, e: (Qwen3MoeConfig, dict(intermediate_size=2 * h,
                                                    moe_intermediate_size=h // 2,
                                                    num_experts=e, num_experts_per_tok=2,
                                                    head_dim=h // 4)),
    "gpt_oss": lambda h, e: (GptOssConfig, dict(intermediate_size=h // 2, num_local_experts=e,
                                                num_experts_per_tok=2, head_dim=h // 4,
                                                sliding_window=8)),
    "deepseek_v3": lambda h, e: (DeepseekV3Config, _mla(h, e)),
    "deepseek_v32": lambda h, e: (DeepseekV32Config, _dsa(h, e)),
    "glm_moe_dsa": lambda h, e: (GlmMoeDsaConfig, _dsa(h, e)),
}
ARCHES = tuple(_CONFIGS)


def tiny_config(arch: str, *, hidden_size: int = 64, num_layers: int = 2,
                experts: int = 4, **overrides: Any) -> PretrainedConfig:
    """The toy config of a family (`overrides` win, e.g. `index_topk`)."""
    if arch not in _CONFIGS:
        raise ValueError(f"no tiny {arch!r} model; known: {', '.join(ARCHES)}")
    tokenizer = _char_tokenizer()
    cls, extra = _CONFIGS[arch](hidden_size, experts)
    fields = dict(vocab_size=len(tokenizer), hidden_size=hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=0.05,
                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fields.update(extra)
    fields.update(overrides)
    return cls(**fields)


def tiny_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A seeded random model of `config`, its LM head scaled as the tiny Llama's (EOS likely in
    some contexts only, so completion lengths vary)."""
    eos = int(config.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head.normal_(0.0, _LM_HEAD_STD)
            head[eos] *= _EOS_ROW_SCALE
    return model


def build_tiny(arch: str, out_dir: Path, *, seed: int = 0, hidden_size: int = 64,
               num_layers: int = 2, experts: int = 4, **overrides: Any) -> Path:
    """Build (once, atomically) a tiny random `arch` base with the char tokenizer."""
    config = tiny_config(arch, hidden_size=hidden_size, num_layers=num_layers,
                         experts=experts, **overrides)

    def write(tmp: Path) -> None:
        tiny_model(config, seed).save_pretrained(tmp)  # type: ignore[operator]
        _char_tokenizer().save_pretrained(tmp)

    return build_model_dir(out_dir, write)
