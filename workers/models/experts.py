"""The fused routed-expert forward with per-token LoRA deltas, shared by trainer and engine.

transformers 5 stores every routed-expert bank as two 3-D Parameters: `gate_up_proj` and
`down_proj`, [E, out, in] for Mixtral/Qwen/DeepSeek/GLM (gate then up), or [E, in, out]
(`is_transposed`) with interleaved gate/up, biases and a clamped activation for GPT-OSS. This is
the eager per-expert loop of transformers' own code (same ops in the same order, so frozen
parts compute bit for bit what the stock module computes) with a LoRA delta added to each
expert's two projections: `(x A_e^T * s) B_e^T`, A [E, R, in], B [E, out, R], `s` each token's
scale row over the R concatenated rank columns (a slot's scale on its own columns, 0 on the
others'), which is how one batch mixes policies. The gating is the module's own `_apply_gate`
(transformers adds the default chunk-and-activate one to every experts class that lacks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertFactors:
    """The LoRA factors of one fused parameter for the rank columns present in a batch."""

    a: torch.Tensor  # [E, R, in]
    b: torch.Tensor  # [E, out, R]


def expert_shape(experts: nn.Module, name: str) -> tuple[int, int, int]:
    """(E, out, in) of a fused parameter, whatever its storage orientation."""
    w = cast(torch.Tensor, getattr(experts, name))
    e, d1, d2 = w.shape
    return (e, d2, d1) if getattr(experts, "is_transposed", False) else (e, d1, d2)


def _project(experts: nn.Module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    w = cast(torch.Tensor, getattr(experts, name))[e]
    y = x @ w if getattr(experts, "is_transposed", False) else F.linear(x, w)
    if getattr(experts, "has_bias", False):
        y = y + cast(torch.Tensor, getattr(experts, f"{name}_bias"))[e]
    return y


def _gate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    apply = getattr(experts, "_apply_gate", None)
    if apply is not None:
        return cast(torch.Tensor, apply(h))
    gate, up = h.chunk(2, dim=-1)
    act = cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)
    return act(gate) * up


def _delta(f: ExpertFactors, e: int, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xa = F.linear(x.to(f.a.dtype), f.a[e]) * scale
    return F.linear(xa, f.b[e])


def experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, factors: dict[str, ExpertFactors] | None,
                    token_scale: torch.Tensor | None) -> torch.Tensor:
    """The bank's output for flat tokens `hidden` [T, H]; `factors` (None: the bare base) with
    `token_scale` [T, R] (or [T, 1] for one slot) add each token's own LoRA delta."""
    out = torch.zeros_like(hidden)
    num = int(cast(torch.Tensor, experts.gate_up_proj).shape[0])
    with torch.no_grad():
        hits = F.one_hot(top_k_index, num_classes=num).permute(2, 1, 0)
        experts_hit = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    for e in experts_hit:
        pos, tok = torch.where(hits[e])
        x = hidden[tok]
        h = _project(experts, "gate_up_proj", e, x)
        if factors is not None and token_scale is not None:
            h = h + _delta(factors["gate_up_proj"], e, x, token_scale[tok]).to(h.dtype)
        g = _gate(experts, h)
        y = _project(experts, "down_proj", e, g)
        if factors is not None and token_scale is not None:
            y = y + _delta(factors["down_proj"], e, g, token_scale[tok]).to(y.dtype)
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out
