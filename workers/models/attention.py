"""Grouped-query attention that reads the KV cache in place instead of copying it per head.

transformers' `sdpa` path calls `repeat_kv` whenever a mask is given (its `use_gqa_in_sdpa`
allows SDPA's own `enable_gqa` only for mask-free CUDA calls), so every decode step copied each
layer's whole cache `num_key_value_groups` times: on SmolLM2 (9 query heads over 3 KV heads)
that copy was a tenth of the CPU engine's time for 64 mixed requests. torch's CPU SDPA takes
masks and `enable_gqa` together, with outputs and gradients equal to the copied path's (tests
compare them), so lorastream registers this as its own attention implementation and every base
loaded through `workers.models.base.load_base_model` that would use `sdpa` uses it instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lorastream_sdpa"


def sdpa_gqa_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa forward with `enable_gqa` instead of `repeat_kv`; anything this does
    not cover (no grouping, differing K and V head sizes, a position bias, attention weights
    asked for) is handed to transformers' own function unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or key.shape[-1] != value.shape[-1] or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_length:  # an empty static cache's prefill, as transformers
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling, is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: PreTrainedModel) -> None:
    """Switch a model loaded with `sdpa` attention to `sdpa_gqa_forward` (others keep theirs:
    eager-only models such as GPT-OSS, and flash or flex kernels someone chose on purpose)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
