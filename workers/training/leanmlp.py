"""Memory-lean SwiGLU MLPs for training: backward keeps the gate and up projections only.

A Llama-style MLP computes down(silu(gate(x)) * up(x)). Plain autograd keeps four MLP-wide
tensors a token for backward: gate(x) (silu's input), silu's output and up(x) (the product's
inputs), and the product (the down projection's LoRA A needs it for its gradient): most of a
decoder layer's saved activations. Here one autograd function
computes the product *and* its LoRA A projection, and keeps gate(x) and up(x) only: backward
recomputes silu and the product, elementwise work that is small beside the layer's matmuls.

Why it matters: a joint step's passes are sized by activation memory (`workers.training.multipass`),
and this is what lets two SmolLM2 policies share a pass within the multi-policy benchmark's
memory target (figures: docs/performance.md, "Inside the trainer").
The forward is bit-identical to the plain module's (the same ops in the same order); gradients
agree to rounding (tests compare against peft in float64).

Only MLPs whose forward *is* Llama's (compared by bytecode, so Mistral's and Qwen's copies of it
qualify) with a SiLU activation are switched; anything else keeps its own forward.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP

if TYPE_CHECKING:
    from workers.training.multilora import MultiLoraLinear


def _silu_parts(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sig = torch.sigmoid(gate)
    return sig, gate * sig


class _SwiGLU(torch.autograd.Function):
    """p = silu(gate) * up, keeping only gate and up (silu(gate) and p are recomputed)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig, silu = _silu_parts(gate)
        return _gate_grad(grad_p, gate, up, sig), grad_p * silu


class _SwiGLUThenA(torch.autograd.Function):
    """(p, p @ A^T) with p = silu(gate) * up, keeping gate, up and A: the LoRA A projection's
    weight gradient needs p, which backward recomputes instead of keeping."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor,
                a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.silu(gate) * up
        ctx.save_for_backward(gate, up, a)
        return p, F.linear(p, a)

    @staticmethod
    def backward(ctx: Any, grad_p: torch.Tensor | None, grad_xa: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        gate, up, a = ctx.saved_tensors
        sig, silu = _silu_parts(gate)
        total = torch.zeros_like(gate) if grad_p is None else grad_p
        grad_a = None
        if grad_xa is not None:
            total = total + grad_xa @ a
            if ctx.needs_input_grad[2]:
                p = silu * up
                grad_a = grad_xa.reshape(-1, a.shape[0]).T @ p.reshape(-1, a.shape[1])
        return _gate_grad(total, gate, up, sig), total * silu, grad_a


def _gate_grad(grad_p: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               sig: torch.Tensor) -> torch.Tensor:
    """d/dgate of silu(gate) * up: silu'(g) = sig * (1 + g * (1 - sig)), as torch's silu."""
    return (grad_p * up) * (sig * (1 + gate * (1 - sig)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)  # type: ignore[no-any-return]


def swiglu_then_a(gate: torch.Tensor, up: torch.Tensor,
                  a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _SwiGLUThenA.apply(gate, up, a)  # type: ignore[no-any-return]


def _lean_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if hasattr(down, "forward_swiglu"):
        return down.forward_swiglu(gate, up)  # type: ignore[no-any-return]
    return down(swiglu(gate, up))  # type: ignore[no-any-return]


_SILU = (nn.SiLU, SiLUActivation)


def _is_llama_swiglu(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    llama = LlamaMLP.forward.__code__
    return (code is not None and code.co_code == llama.co_code
            and code.co_names == llama.co_names
            and type(getattr(module, "act_fn", None)) in _SILU)


def make_mlps_lean(model: nn.Module) -> int:
    """Switch every Llama-style SwiGLU MLP of `model` to the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if _is_llama_swiglu(module):
            module.forward = types.MethodType(_lean_forward, module)  # type: ignore[method-assign]
            count += 1
    return count


def lora_down(layer: MultiLoraLinear, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`layer(silu(gate) * up)` for a MultiLoraLinear down projection, lean in memory."""
    r = layer.routing
    if r.single is not None:
        key = f"s{r.single}"
        p, xa = swiglu_then_a(gate, up, layer.lora_A[key])
        return layer.base(p) + F.linear(xa, layer.lora_B[key]) * r.scales[r.single]
    if not r.slots:
        return layer.base(swiglu(gate, up))  # type: ignore[no-any-return]
    a, b = layer.concatenated()
    p, xa = swiglu_then_a(gate, up, a)
    return layer.base(p) + F.linear(xa * r.row_mask(p), b)
