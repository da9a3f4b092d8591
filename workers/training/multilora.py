"""Batched multi-LoRA for training: rows of one batch belong to different policies.

peft refuses mixed-adapter batches in training mode (`adapter_names=`, peft's
`tuners/lora/model.py`), and its mixed path loops per adapter in Python
(`Linear._mixed_batch_forward`) and breaks gradient checkpointing (the recompute runs after peft
removed the hooks that pass `adapter_names`). Here every targeted linear (and every
fused MoE expert stack) is wrapped once; each policy slot owns its own A/B Parameters, so
optimizers stay per policy. A forward runs the frozen base matmul once for all rows and adds
every row's own LoRA delta with the "masked concatenated rank" trick: the A's of the slots
present in the batch are concatenated, `x @ A_cat^T` is masked so each row keeps only its own
slot's rank columns (times that slot's scaling), and one more matmul with B_cat adds the delta.
Only present slots enter the graph, so an absent policy's parameters get `grad=None`, never a
zero gradient its optimizer would still act on through momentum (what a stacked parameter would
give it).

The routing (row -> slot) lives in one `Routing` object shared by all wrapped layers; it is set
before a forward and left in place until the backward has finished, so gradient checkpointing
recomputes each layer with the same routing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.training.leanmlp import lora_down, make_mlps_lean

PEFT_PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""Fused expert parameters (Mixtral/Qwen-MoE layout [E, out, in]), in registration order."""
_EXPERT_PEFT_INFIX = {"gate_up_proj": ".base_layer", "down_proj": ""}
"""peft nests one ParamWrapper per targeted parameter; the first registered is innermost."""


@dataclass
class Routing:
    """Which slot each batch row uses, and the per-row mask over the concatenated ranks."""

    ranks: dict[int, int] = field(default_factory=dict)
    scales: dict[int, float] = field(default_factory=dict)
    slots: tuple[int, ...] = ()  # slots present in the current batch, in concat order
    single: int | None = None  # every row uses this one slot: no mask needed
    mask: torch.Tensor | None = None  # [rows, sum of present ranks]
    concat: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """No-grad forwards' concatenated A/B per layer, made once per routing: a sampling pass
    runs one forward per token, and re-concatenating every layer's factors each time was a
    measurable share of a mixed decode (docs/performance.md)."""

    def set(self, row_slots: Sequence[int | None], dtype: torch.dtype) -> None:
        """None rows use the bare base model (their mask row is all zero)."""
        present = tuple(sorted({s for s in row_slots if s is not None}))
        unknown = [s for s in present if s not in self.ranks]
        if unknown:
            raise KeyError(f"no adapter slot {unknown[0]}")
        self.slots, self.mask = present, None
        self.concat.clear()
        self.single = present[0] if len(present) == 1 and None not in row_slots else None
        if not present or self.single is not None:
            return
        owner = torch.cat([torch.full((self.ranks[s],), i) for i, s in enumerate(present)])
        scale = torch.tensor([self.scales[s] for s in present], dtype=dtype)[owner]
        index = {s: i for i, s in enumerate(present)}
        rows = torch.tensor([index[s] if s is not None else -1 for s in row_slots])
        self.mask = (rows[:, None] == owner[None, :]).to(dtype) * scale

    def clear(self) -> None:
        self.slots, self.single, self.mask = (), None, None
        self.concat.clear()

    def row_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask shaped for `x`: [B, 1.., R] for [B, ..., in], per token for flat [B*L, in]."""
        assert self.mask is not None
        rows = self.mask.shape[0]
        if x.shape[0] == rows:
            return self.mask.view(rows, *([1] * (x.dim() - 2)), -1)
        if x.dim() == 2 and x.shape[0] % rows == 0:
            return self.mask.repeat_interleave(x.shape[0] // rows, dim=0)
        raise ValueError(f"input of shape {tuple(x.shape)} does not match {rows} routed rows")


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus each row's own policy delta `scale * (x A^T) B^T`."""

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.lora_A = nn.ParameterDict()  # "s<slot>" -> [r, in]
        self.lora_B = nn.ParameterDict()  # "s<slot>" -> [out, r]

    def add_slot(self, slot: int, rank: int) -> list[nn.Parameter]:
        w = self.base.weight
        a = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device))
        b = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        self.lora_A[f"s{slot}"], self.lora_B[f"s{slot}"] = a, b
        return [a, b]

    def remove_slot(self, slot: int) -> None:
        del self.lora_A[f"s{slot}"], self.lora_B[f"s{slot}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        r = self.routing
        if r.single is not None:
            key = f"s{r.single}"
            delta = F.linear(F.linear(x, self.lora_A[key]), self.lora_B[key])
            return y + delta * r.scales[r.single]
        if not r.slots:
            return y
        a, b = self.concatenated()
        return y + F.linear(F.linear(x, a) * r.row_mask(x), b)

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """`self(silu(gate) * up)` keeping only gate and up for backward
        (`workers.training.leanmlp`)."""
        return lora_down(self, gate, up)

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The present slots' A [sum R, in] and B [out, sum R], in routing order; cached for
        the routing when no graph is recorded (with one, the cat must be part of it)."""
        r = self.routing
        if torch.is_grad_enabled():
            return self._cat()
        hit = r.concat.get(id(self))
        if hit is None:
            hit = r.concat[id(self)] = self._cat()
        return hit

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.routing.slots
        return (torch.cat([self.lora_A[f"s{s}"] for s in slots]),
                torch.cat([self.lora_B[f"s{s}"] for s in slots], dim=1))


class MultiLoraExperts(nn.Module):
    """Fused MoE experts (eager loop over hit experts) with per-token, per-expert LoRA deltas.

    Per slot and parameter: A [E, r, in] and B [E, out, r], i.e. rank r on every expert, which
    is what peft's `target_parameters` LoRA (`ParamWrapper`, peft >= 0.17) does for a 3-D
    parameter.
    """

    def __init__(self, experts: nn.Module, routing: Routing) -> None:
        super().__init__()
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise ValueError(f"{type(experts).__name__}: only [E, out, in] experts without bias")
        self.experts = experts
        self.num_experts = int(cast(torch.Tensor, experts.gate_up_proj).shape[0])
        self.act_fn = cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)
        self.routing = routing
        self.lora_A = nn.ParameterDict()  # "<param>_s<slot>" -> [E, r, in]
        self.lora_B = nn.ParameterDict()  # "<param>_s<slot>" -> [E, out, r]

    def add_slot(self, slot: int, rank: int) -> list[nn.Parameter]:
        params = []
        for name in EXPERT_PARAMS:
            w = self.weight(name)
            e, out, inp = w.shape
            a = nn.Parameter(torch.zeros(e, rank, inp, dtype=w.dtype, device=w.device))
            b = nn.Parameter(torch.zeros(e, out, rank, dtype=w.dtype, device=w.device))
            self.lora_A[f"{name}_s{slot}"], self.lora_B[f"{name}_s{slot}"] = a, b
            params += [a, b]
        return params

    def remove_slot(self, slot: int) -> None:
        for name in EXPERT_PARAMS:
            del self.lora_A[f"{name}_s{slot}"], self.lora_B[f"{name}_s{slot}"]

    def weight(self, name: str) -> torch.Tensor:
        """The frozen fused expert weight [E, out, in] (the original Parameter, not a copy)."""
        return cast(torch.Tensor, getattr(self.experts, name))

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        slots = self.routing.slots
        if not slots:
            return None
        a = torch.cat([self.lora_A[f"{name}_s{s}"] for s in slots], dim=1)
        b = torch.cat([self.lora_B[f"{name}_s{s}"] for s in slots], dim=2)
        return a, b

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        w_gate_up, w_down = self.weight("gate_up_proj"), self.weight("down_proj")
        out = torch.zeros_like(hidden)
        gu, dn = self._factors("gate_up_proj"), self._factors("down_proj")
        r = self.routing
        tok_scale: torch.Tensor | None = None
        if gu is not None:
            tok_scale = (r.row_mask(hidden) if r.single is None else
                         torch.full((hidden.shape[0], 1), r.scales[r.single], dtype=hidden.dtype))
        with torch.no_grad():
            hits = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            experts_hit = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for e in experts_hit:
            pos, tok = torch.where(hits[e])
            x = hidden[tok]
            h = F.linear(x, w_gate_up[e])
            if gu is not None and tok_scale is not None:
                h = h + F.linear(F.linear(x, gu[0][e]) * tok_scale[tok], gu[1][e])
            gate, up = h.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            y = F.linear(h, w_down[e])
            if dn is not None and tok_scale is not None:
                y = y + F.linear(F.linear(h, dn[0][e]) * tok_scale[tok], dn[1][e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Parameter)
               and getattr(module, n).dim() == 3 for n in EXPERT_PARAMS)


class MultiLora:
    """Owns the routing and the wrapped layers of one base model; slots are added per policy."""

    def __init__(self, model: nn.Module, routing: Routing,
                 linears: dict[str, MultiLoraLinear], experts: dict[str, MultiLoraExperts]):
        self.model, self.routing, self.linears, self.experts = model, routing, linears, experts

    @classmethod
    def install(cls, model: nn.Module, target_modules: Sequence[str], *,
                target_experts: bool = True) -> MultiLora:
        """Wrap (in place) each nn.Linear named in `target_modules` and each fused expert stack,
        and give SwiGLU MLPs the memory-lean forward (`workers.training.leanmlp`)."""
        wanted, routing = set(target_modules), Routing()
        linears: dict[str, MultiLoraLinear] = {}
        experts: dict[str, MultiLoraExperts] = {}
        for name, module in list(model.named_modules()):
            wrapper: nn.Module
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
                wrapper = linears[name] = MultiLoraLinear(module, routing)
            elif target_experts and _is_fused_experts(module):
                wrapper = experts[name] = MultiLoraExperts(module, routing)
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapper)
        if not linears and not experts:
            raise ValueError(f"no target modules {sorted(wanted)} in the model")
        make_mlps_lean(model)
        return cls(model, routing, linears, experts)

    def add_slot(self, slot: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """Create slot parameters: A kaiming-uniform (peft's init, layer order), B zero."""
        if slot in self.routing.ranks:
            raise KeyError(f"slot {slot} exists")
        params: list[nn.Parameter] = []
        for layer in self.linears.values():
            params += layer.add_slot(slot, rank)
        for ex in self.experts.values():
            params += ex.add_slot(slot, rank)
        with torch.no_grad():
            for a in params[0::2]:
                flat = a.view(-1, a.shape[-1])  # experts: peft's A is [E*r, in]
                nn.init.kaiming_uniform_(flat, a=math.sqrt(5), generator=generator)
        self.routing.ranks[slot], self.routing.scales[slot] = rank, alpha / rank
        return params

    def remove_slot(self, slot: int) -> None:
        for linear in self.linears.values():
            linear.remove_slot(slot)
        for ex in self.experts.values():
            ex.remove_slot(slot)
        del self.routing.ranks[slot], self.routing.scales[slot]

    @contextmanager
    def route(self, row_slots: Sequence[int | None]) -> Iterator[None]:
        """Route rows for a forward (and its backward, if run inside the block)."""
        self.routing.set(row_slots, self._dtype())
        try:
            yield
        finally:
            self.routing.clear()

    def _dtype(self) -> torch.dtype:
        for layer in self.linears.values():
            return layer.base.weight.dtype
        return next(iter(self.experts.values())).weight("gate_up_proj").dtype

    def export(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot as a peft state dict (saved-key format: adapter name stripped, fp32)."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.linears.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[f"s{slot}"].detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[f"s{slot}"].detach()
        for name, ex in self.experts.items():
            for param in EXPERT_PARAMS:
                a = ex.lora_A[f"{param}_s{slot}"].detach()
                b = ex.lora_B[f"{param}_s{slot}"].detach()
                e, rank, inp = a.shape
                key = f"{PEFT_PREFIX}{name}{_EXPERT_PEFT_INFIX[param]}"
                out[f"{key}.lora_A.weight"] = a.reshape(e * rank, inp)
                # peft reads B [out, r*E] as .reshape(out, r, E): expert-minor columns
                out[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * e)
        return {k: v.to("cpu", torch.float32).clone().contiguous() for k, v in out.items()}

    def load(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a peft state dict into a slot; every key and shape is checked before any copy."""
        expected = self.export(slot)
        if set(tensors) != set(expected):
            missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
            raise ValueError(f"adapter keys mismatch: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(expected[key].shape):
                raise ValueError(f"{key}: shape {tuple(t.shape)} != {tuple(expected[key].shape)}")
        with torch.no_grad():
            for name, layer in self.linears.items():
                layer.lora_A[f"s{slot}"].copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                layer.lora_B[f"s{slot}"].copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
            for name, ex in self.experts.items():
                for param in EXPERT_PARAMS:
                    key = f"{PEFT_PREFIX}{name}{_EXPERT_PEFT_INFIX[param]}"
                    a, b = ex.lora_A[f"{param}_s{slot}"], ex.lora_B[f"{param}_s{slot}"]
                    e, rank, _ = a.shape
                    a.copy_(tensors[f"{key}.lora_A.weight"].view(a.shape))
                    b_peft = tensors[f"{key}.lora_B.weight"].view(b.shape[1], rank, e)
                    b.copy_(b_peft.permute(2, 0, 1))

    def target_parameters(self) -> list[str]:
        """peft `target_parameters` entries for the wrapped experts (empty for dense models)."""
        return [f"experts.{p}" for p in EXPERT_PARAMS] if self.experts else []
