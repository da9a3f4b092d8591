"""The per-forward LoRA math of the slot engine: which slots a batch uses, and how each wrapped
linear adds their deltas.

Why it looks like this (the timings are in docs/performance.md, "Inside the CPU engine"):
- the LoRA factors stay float32 even when the base serves bfloat16: a small-rank matmul is
  cheaper in float32 than through oneDNN's bfloat16 path on CPU, and float32 keeps the trainer's
  exported weights exact; the delta is added into the bfloat16 output in one rounding;
- the base linear is called as `F.linear` (no second module call), or through its oneDNN-packed
  weight on a float32 CPU model (`workers.serving.packed`), the slot's A/B are per-slot
  views made once, and peft's scale rides on `add_(alpha=...)`: three kernels per linear for a
  single-adapter batch instead of eight;
- a mixed batch gathers only the D distinct adapters it names (not one copy per row) into
  `[D*R, in]` / `[out, D*R]` once per batch, and a row mask (the row's scale on its adapter's
  rank block, zero elsewhere and for base rows) selects each row's delta: two matmuls per
  linear whatever the row count, like SGMV's segments;
- the delta's matmuls run on one intra-op thread whatever the forward's count: for a rank-8
  matmul the fork/join barrier of two threads costs more than the math, and much more when a
  sibling thread is descheduled on a shared CPU. `torch.set_num_threads` is thread-local for
  OpenMP and MKL and cheap (torch's process-wide default flips with it, which only threads that
  never set their own count read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.packed import PackedLinear, pack_linear

if TYPE_CHECKING:
    from workers.models.experts import ExpertFactors
    from workers.serving.slot_experts import SlotExperts


SEGMENT_MIN_TOKENS = 32
"""A grouped batch takes one delta per adapter (its rank only, on its rows) from this many tokens
an adapter on average (a prefill); below it (decode steps) two matmuls over all rows with the
masked concatenated ranks cost less than a pair of calls per adapter."""


class SlotContext:
    """Which slot each batch row uses; shared by every SlotLinear of one model."""

    def __init__(self, scales: torch.Tensor, max_rank: int,
                 device: torch.device | str = "cpu") -> None:
        self.scales = scales  # [num_slots] peft scale per slot (0 for an empty slot)
        self.max_rank = max_rank
        self.device = torch.device(device)  # the slot storage's (and the model's)
        self.single: int | None = None  # every row uses this slot
        self.single_scale = 0.0
        self.distinct: torch.Tensor | None = None  # mixed batch: its distinct slots [D]
        self.mask: torch.Tensor | None = None  # [rows, D*R]
        self.segments: list[tuple[int, int, int, float]] | None = None
        """Mixed batch whose rows come grouped by adapter: (slot, first row, end, scale) per
        group, base rows left out. Set only when every adapter's rows are contiguous."""
        self.threads = 1  # the forward's intra-op threads, restored after each LoRA delta
        self.row_slots: list[int | None] = []  # what `set_rows` was given
        self._gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._experts: dict[int, dict[str, ExpertFactors]] = {}

    def set_rows(self, slots: list[int | None]) -> None:
        """Rows with None use the bare base model (their LoRA delta is masked to 0)."""
        self.clear()
        self.row_slots = list(slots)
        distinct = sorted({s for s in slots if s is not None})
        if not distinct:
            return
        if len(distinct) == 1 and None not in slots:
            self.single = distinct[0]
            self.single_scale = float(self.scales[self.single])
            return
        where = {s: d for d, s in enumerate(distinct)}
        mask = torch.zeros(len(slots), len(distinct), self.max_rank, dtype=self.scales.dtype)
        for row, slot in enumerate(slots):
            if slot is not None:
                mask[row, where[slot]] = self.scales[slot]
        self.distinct = torch.tensor(distinct, dtype=torch.long, device=self.device)
        self.mask = mask.reshape(len(slots), -1).to(self.device)
        self.segments = _segments(slots, self.scales)

    def clear(self) -> None:
        self.single, self.single_scale = None, 0.0
        self.row_slots = []
        self.distinct = self.mask = None
        self.segments = None
        self._gathered.clear()
        self._experts.clear()

    def gathered_experts(self, module: SlotExperts) -> dict[str, ExpertFactors]:
        """An expert bank's factors of the batch's distinct slots (cached for the batch)."""
        hit = self._experts.get(id(module))
        if hit is None:
            assert self.distinct is not None
            hit = self._experts[id(module)] = module.gather(self.distinct)
        return hit

    def gathered(self, module: SlotLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's adapters of `module` side by side: A as [D*R, in], B as [out, D*R]
        (cached for the batch: every decode step of it reuses them)."""
        hit = self._gathered.get(id(module))
        if hit is None:
            assert self.distinct is not None
            a, b = module.a[self.distinct], module.b[self.distinct]  # [D,R,in], [D,out,R]
            hit = (a.reshape(-1, a.shape[-1]), b.permute(1, 0, 2).reshape(b.shape[1], -1))
            self._gathered[id(module)] = hit
        return hit


class SlotLinear(nn.Module):
    """A frozen base linear plus the LoRA delta of the slot(s) the current batch uses."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, ctx: SlotContext):
        super().__init__()
        self.base: nn.Module = pack_linear(base)
        self._packed = isinstance(self.base, PackedLinear)
        self.a, self.b, self.ctx = a, b, ctx  # views into the slot storage, not parameters
        self._a_of, self._b_of = a.unbind(0), b.unbind(0)  # per-slot views, made once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed:
            y = self.base(x)
        else:
            base = cast(nn.Linear, self.base)
            y = F.linear(x, base.weight, base.bias)
        ctx = self.ctx
        if ctx.single is None and ctx.mask is None:
            return y
        if ctx.threads == 1:
            return self._add_delta(x, y)
        torch.set_num_threads(1)  # thread-local (OpenMP and MKL), and cheap
        try:
            return self._add_delta(x, y)
        finally:
            torch.set_num_threads(ctx.threads)

    def _add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.single is not None:
            s = ctx.single
            xa = F.linear(x.to(self.a.dtype), self._a_of[s])
            return y.add_(F.linear(xa, self._b_of[s]), alpha=ctx.single_scale)
        segments = ctx.segments
        if segments is not None and x.numel() >= SEGMENT_MIN_TOKENS * len(segments) * x.shape[-1]:
            for slot, start, end, scale in segments:
                xa = F.linear(x[start:end].to(self.a.dtype), self._a_of[slot])
                y[start:end].add_(F.linear(xa, self._b_of[slot]), alpha=scale)
            return y
        a, b = ctx.gathered(self)
        xa = F.linear(x.to(a.dtype), a)  # [rows, ..., D*R]
        assert ctx.mask is not None
        mask = ctx.mask.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return y.add_(F.linear(xa.mul_(mask), b))


def _segments(slots: list[int | None], scales: torch.Tensor
              ) -> list[tuple[int, int, int, float]] | None:
    """The adapter groups of rows that come grouped (None otherwise)."""
    out: list[tuple[int, int, int, float]] = []
    start = 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[start]:
            slot = slots[start]
            if slot is not None:
                if any(slot == seen for seen, _, _, _ in out):
                    return None
                out.append((slot, start, row, float(scales[slot])))
            start = row
    return out
