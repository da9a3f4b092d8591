"""lorastream's grouped-query attention equals transformers' copying `sdpa` path.

The function is checked against transformers' own `sdpa_attention_forward` (which copies the
KV heads with `repeat_kv` whenever a mask is given) in float64, forward and backward; the
models loaded by `load_base_model` are checked to use it where they would use `sdpa`, with
logits equal to the `sdpa` model's on a padded batch and a cached decode step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from workers.models.attention import NAME, sdpa_gqa_forward
from workers.models.base import load_base_model
from workers.models.tiny import build_tiny


class _Attn(nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _padded_causal_mask(rows: int, q: int, kv: int, pad: list[int]) -> torch.Tensor:
    mask = torch.ones(q, kv, dtype=torch.bool).tril(kv - q).expand(rows, 1, q, kv).clone()
    for i, p in enumerate(pad):
        mask[i, :, :, :p] = False
    return mask


@pytest.mark.parametrize("q_len", [1, 6])  # a decode step, a prefill
def test_matches_transformers_sdpa_with_a_mask_forward_and_backward(q_len: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, kv = 3, 6

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    q, k, v = rand(rows, 9, q_len, 16), rand(rows, 3, kv, 16), rand(rows, 3, kv, 16)
    mask = _padded_causal_mask(rows, q_len, kv, pad=[0, 2, 4])
    grad = torch.randn(rows, q_len, 9, 16, generator=gen, dtype=torch.float64)
    ours, _ = sdpa_gqa_forward(_Attn(), q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad),
                    torch.autograd.grad(theirs, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_loaded_gqa_model_uses_it_and_gives_the_same_logits(tmp_path: Path) -> None:
    model, _ = load_base_model(build_tiny("llama", tmp_path / "llama"))
    assert model.config._attn_implementation == NAME
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill_then_decode() -> tuple[torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                      past_key_values=cache, use_cache=True).logits
        step = model(input_ids=first[:, -1].argmax(-1, keepdim=True),
                     attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True).logits
        return first, step

    with torch.no_grad():
        ours = prefill_then_decode()
        model.set_attn_implementation("sdpa")
        theirs = prefill_then_decode()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_models_without_sdpa_keep_their_attention(tmp_path: Path) -> None:
    model, _ = load_base_model(build_tiny("gpt_oss", tmp_path / "gpt_oss"))
    assert model.config._attn_implementation not in ("sdpa", NAME)
