"""Llama entirely in float64, for oracle comparisons.

A float64 Llama in transformers still computes two things in float32 by design: RMSNorm's
variance and the rotary cos/sin. Two implementations that take different (equally exact) paths
through the model then differ by float32 roundings, and the first AdamW step (an update of
`lr * g / (|g| + eps)`) can amplify an absolute difference in a near-zero gradient entry by up
to lr/eps, about 2e6. These replacements compute the same formulas in the
input's dtype, so two float64 trainers agree to float64 rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama


def _rms_norm(self: modeling_llama.LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _rotary(self: modeling_llama.LlamaRotaryEmbedding, x: torch.Tensor,
            position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).to(x.dtype)
    freqs = (inv_freq @ position_ids[:, None, :].to(x.dtype)).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def llama_in_input_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """For this test only: Llama's RMSNorm and rotary embedding in the input's dtype."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _rotary)
