"""Frozen float32 base weights in oneDNN's packed layout, for forwards that never train.

`F.linear` hands each call to MKL's sgemm, which repacks the weight's panels on every call: at
a decode step's few rows that repacking costs as much as the arithmetic. oneDNN can pack a
weight once and reuse it, which at 24-64 rows ran SmolLM2's projections 5-31% faster (but its
narrow k/v ones 30% slower at 24 rows, 5% faster at 64) and its 49,152-entry LM head 1.4-1.9x
faster (figures in docs/performance.md, "Inside the CPU engine"). Results differ from
`F.linear`'s in the last float32 bits only (another summation order), as any other batch
shape's would.

The CPU engine only runs forwards, so each packed base weight *replaces* its original; a head
tied to the input embedding keeps the embedding and adds its packed copy (SmolLM2-135M: 113
MB). transformers maps a safetensors file and its weights are views of that mapping, which
stays (and counts in RSS) while any view lives: `own_memory` copies what is left (embedding,
norms, buffers) so the mapping goes, and the packed engine ends ~100 MB above an unpacked one
(SmolLM2-135M: 1.50 GB against 1.40 GB RSS after a forward) instead of ~500 MB.

The trainer needs its weights for backward, so its rollout sampler borrows a packed copy of the
head only (`using_head`): the head is the widest matmul of a decode step. Only a float32 model
on the CPU with oneDNN is packed; anything else (bfloat16, CUDA) keeps `F.linear`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def packable(model: nn.Module) -> bool:
    """Whether `model` is float32 on a CPU whose torch has oneDNN (its head tells)."""
    head = _head(model)
    return head is not None and _packs(head.weight)


def _packs(weight: torch.Tensor) -> bool:
    return (torch.backends.mkldnn.is_available() and weight.device.type == "cpu"
            and weight.dtype == torch.float32)


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight packed once by oneDNN (no autograd: serving only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        # a copy: the original may view a mapped weight file that should be let go
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def _head(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Linear) else None


def packed_head(model: nn.Module) -> PackedLinear | None:
    """A packed copy of the LM head, or None where `packable` is not."""
    head = _head(model)
    return PackedLinear(head) if head is not None and packable(model) else None


def pack_head(model: nn.Module) -> bool:
    """Swap the LM head for its packed form; False (nothing done) where `packable` is not."""
    head = packed_head(model)
    if head is not None:
        model.lm_head = head
    return head is not None


def own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer left in `model` into memory of its own (ties kept)."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.clone())


@contextmanager
def using_head(model: nn.Module, head: nn.Module | None) -> Iterator[None]:
    """`model` runs with `head` as its LM head inside the block (None: unchanged)."""
    if head is None:
        yield
        return
    original = model.lm_head
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = original


def pack_linear(linear: nn.Linear) -> nn.Module:
    """The packed stand-in of a frozen float32 CPU linear, or the linear itself otherwise."""
    w = linear.weight
    return PackedLinear(linear) if _packs(w) and not w.requires_grad else linear
