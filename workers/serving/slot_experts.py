"""Expert slots: the CPU engine's LoRA on fused routed-expert banks, and the layouts it reads.

Each slot holds, per expert bank and fused parameter, A [E, R, in] and B [E, out, R] (views into
the slot's flat float32 row, like `slot_linear`'s). A batch's forward is the shared expert loop
(`workers.models.experts`, the trainer's own), with each token's scale row over the present
slots' rank columns, so engine and trainer compute the same expert deltas.

Two adapter layouts load into these slots:
- peft's `target_parameters` keys, as lorastream exports them: `<bank>.base_layer.lora_{A,B}`
  for `gate_up_proj` and `<bank>.lora_{A,B}` for `down_proj`, A [E*r, in], B [out, r*E] with
  expert-minor columns;
- SGLang's per-expert 2-D keys, `<bank>.<e>.{gate,up,down}_proj.lora_{A,B}` (what
  `workers.serving.sglang_layout.to_sglang` writes): gate and up fuse into `gate_up_proj` in
  the bank's own row order (concatenated, or interleaved for GPT-OSS); if gate and up do not
  share A, they fuse block-diagonally at rank 2r.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from workers.models.experts import ExpertFactors, expert_shape, experts_forward

if TYPE_CHECKING:
    from workers.serving.slot_linear import SlotContext

_PER_EXPERT = re.compile(r"^(?P<bank>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertSpan:
    """Where one bank parameter's A [E, R, in] and B [E, out, R] live in a slot's row."""

    name: str  # the bank's module name
    param: str  # gate_up_proj | down_proj
    experts: int
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int

    def numel(self, rank: int) -> int:
        return self.experts * rank * (self.in_features + self.out_features)


class SlotExperts(nn.Module):
    """A frozen expert bank plus the LoRA deltas of the slots the current batch names."""

    def __init__(self, experts: nn.Module, views: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 ctx: SlotContext) -> None:
        super().__init__()
        self.experts = experts
        self.views = views  # param -> (A [slots, E, R, in], B [slots, E, out, R])
        self.ctx = ctx

    def _factors(self, tokens: int) -> tuple[dict[str, ExpertFactors] | None,
                                             torch.Tensor | None]:
        ctx = self.ctx
        if ctx.single is not None:
            s = ctx.single
            a_any = next(iter(self.views.values()))[0]
            scale = torch.full((tokens, 1), ctx.single_scale, dtype=a_any.dtype,
                               device=a_any.device)
            return {p: ExpertFactors(a[s], b[s]) for p, (a, b) in self.views.items()}, scale
        if ctx.mask is None or ctx.distinct is None:
            return None, None
        hit = ctx.gathered_experts(self)
        rows = ctx.mask.shape[0]
        return hit, ctx.mask.repeat_interleave(tokens // rows, dim=0)

    def gather(self, distinct: torch.Tensor) -> dict[str, ExpertFactors]:
        """The batch's distinct slots side by side: A [E, D*R, in], B [E, out, D*R]."""
        out = {}
        for p, (a, b) in self.views.items():
            ga, gb = a[distinct], b[distinct]  # [D, E, R, in], [D, E, out, R]
            d, e, r, i = ga.shape
            out[p] = ExpertFactors(ga.permute(1, 0, 2, 3).reshape(e, d * r, i),
                                   gb.permute(1, 2, 0, 3).reshape(e, gb.shape[2], d * r))
        return out

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        factors, scale = self._factors(hidden.shape[0])
        return experts_forward(self.experts, hidden, top_k_index, top_k_weights, factors, scale)


def expert_spans(banks: list[tuple[str, nn.Module]], max_rank: int,
                 offset: int) -> tuple[list[ExpertSpan], int]:
    """Spans of every bank's two parameters from `offset` on; returns them and the new end."""
    spans = []
    for name, bank in sorted(banks, key=lambda b: b[0]):
        for param in ("gate_up_proj", "down_proj"):
            e, out, inp = expert_shape(bank, param)
            a_off = offset
            b_off = a_off + e * max_rank * inp
            offset = b_off + e * out * max_rank
            spans.append(ExpertSpan(name, param, e, inp, out, a_off, b_off))
    return spans, offset


def native_expert_tensor(param: str, kind: str, t: torch.Tensor, experts: int) -> torch.Tensor:
    """peft's 2-D expert factor as [E, r, in] (A) or [E, out, r] (B)."""
    if kind == "A":
        return t.reshape(experts, -1, t.shape[-1])
    out = t.shape[0]
    return t.reshape(out, -1, experts).permute(2, 0, 1)


def fuse_per_expert(tensors: dict[str, torch.Tensor], banks: dict[str, nn.Module]
                    ) -> tuple[dict[tuple[str, str, str], torch.Tensor], dict[str, torch.Tensor]]:
    """Split SGLang-style per-expert keys off `tensors` and fuse them per bank: returns
    {(bank, param, "A"|"B"): [E, r, in] / [E, out, r]} and the untouched other tensors."""
    per: dict[tuple[str, int, str, str], torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, kind = _split(key)
        m = _PER_EXPERT.match(module) if module is not None else None
        if m is None or m["bank"] not in banks:
            rest[key] = t
            continue
        per[(m["bank"], int(m["e"]), m["proj"], cast(str, kind))] = t
    fused: dict[tuple[str, str, str], torch.Tensor] = {}
    for bank in sorted({k[0] for k in per}):
        bank_module = banks[bank]
        e_count = expert_shape(bank_module, "gate_up_proj")[0]
        got = {k[1:]: v for k, v in per.items() if k[0] == bank}
        interleaved = not getattr(bank_module, "is_concatenated", True)
        ga, gb = [], []
        da, db = [], []
        for e in range(e_count):
            a, b = _gate_up(got, e, interleaved)
            ga.append(a)
            gb.append(b)
            da.append(got[(e, "down_proj", "A")])
            db.append(got[(e, "down_proj", "B")])
        fused[(bank, "gate_up_proj", "A")] = torch.stack(ga)
        fused[(bank, "gate_up_proj", "B")] = torch.stack(gb)
        fused[(bank, "down_proj", "A")] = torch.stack(da)
        fused[(bank, "down_proj", "B")] = torch.stack(db)
    return fused, rest


def _gate_up(got: dict[tuple[int, str, str], torch.Tensor], e: int,
             interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's gate and up factors as one gate_up A [r', in], B [2I, r']."""
    try:
        a_g, b_g = got[(e, "gate_proj", "A")], got[(e, "gate_proj", "B")]
        a_u, b_u = got[(e, "up_proj", "A")], got[(e, "up_proj", "B")]
    except KeyError as exc:
        raise ValueError(f"per-expert adapter lacks expert {e}'s {exc.args[0][1]}") from exc
    if torch.equal(a_g, a_u):
        a, b_gate, b_up = a_g, b_g, b_u
    else:  # independent A's: block-diagonal at rank 2r (exact)
        a = torch.cat([a_g, a_u])
        b_gate = torch.cat([b_g, torch.zeros_like(b_u)], dim=1)
        b_up = torch.cat([torch.zeros_like(b_g), b_u], dim=1)
    if interleaved:
        b = torch.stack([b_gate, b_up], dim=1).reshape(-1, b_gate.shape[1])
    else:
        b = torch.cat([b_gate, b_up])
    return a, b


def _split(key: str) -> tuple[str | None, str | None]:
    name = key.removeprefix("base_model.model.")
    for kind in ("A", "B"):
        suffix = f".lora_{kind}.weight"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None, None
