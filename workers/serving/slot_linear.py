"""The per-forward LoRA math of the slot engine: which slots a batch uses, and how each wrapped
linear adds their deltas.

Why it looks like this (the timings are in docs/performance.md, "Inside the CPU engine"):
- the LoRA factors stay float32 even when the base serves bfloat16: a small-rank matmul is
  cheaper in float32 than through oneDNN's bfloat16 path on CPU, and float32 keeps the trainer's
  exported weights exact; the delta is added into the bfloat16 output in one rounding;
- the base linear is called as `F.linear` (no second module call), or through its oneDNN-packed
  weight on a float32 CPU model (`workers.models.packed`), the slot's A/B are per-slot
  views made once, and peft's scale rides on `add_(alpha=...)`: three kernels per linear for a
  single-adapter batch instead of eight;
- a mixed batch gathers only the D distinct adapters it names (not one copy per row) into
  `[D, in, R]` / `[D, R, out]` once per batch (B scaled by the adapter's peft scale), and its
  rows, padded into D equal groups of one adapter each, take their deltas in two batched
  matmuls per linear whatever the row count, like SGMV's segments; base rows take none. A
  64-row decode step's deltas cost about half what a row mask over all D*R ranks did;
- one adapter's delta (a whole batch's, or a prefill segment's) runs on one intra-op thread
  whatever the forward's count (the grouped `bmm`s keep the forward's threads, which split the
  groups between them): for a rank-8 matmul the fork/join barrier of two threads costs more
  than the math, and much more when a sibling thread is descheduled on a shared CPU.
  `torch.set_num_threads` is thread-local for OpenMP and MKL and cheap (torch's process-wide
  default flips with it, which only threads that never set their own count read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.packed import PackedLinear, pack_linear

if TYPE_CHECKING:
    from workers.models.experts import ExpertFactors
    from workers.serving.slot_experts import SlotExperts


SEGMENT_MIN_TOKENS = 32
"""A batch whose rows come grouped takes one delta per adapter (its rank only, on its rows, on
one thread) from this many tokens an adapter on average (a prefill: 3% faster there); below it
(decode steps) the padded groups' two batched matmuls on the forward's threads cost less."""


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
        self.mask: torch.Tensor | None = None  # [rows, D*R] row scales (expert banks)
        self.groups: RowGroups | None = None  # mixed batch: its rows by adapter
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
        self.groups = RowGroups.of(slots, distinct, self.device)
        self.segments = _segments(slots, self.scales)

    def clear(self) -> None:
        self.single, self.single_scale = None, 0.0
        self.row_slots = []
        self.distinct = self.mask = self.groups = None
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
        """The batch's adapters of `module`: A as [D, in, R], B times its scale as [D, R, out]
        (cached for the batch: every decode step of it reuses them)."""
        hit = self._gathered.get(id(module))
        if hit is None:
            assert self.distinct is not None
            a, b = module.a[self.distinct], module.b[self.distinct]  # [D,R,in], [D,out,R]
            b = b * self.scales[self.distinct].to(b.device, b.dtype)[:, None, None]
            hit = (a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous())
            self._gathered[id(module)] = hit
        return hit


@dataclass(frozen=True)
class RowGroups:
    """A mixed batch's adapter rows as D groups of `size` places, in `distinct` order.
    `gather` names each place's batch row (a short group repeats its first row), `real` the
    places holding the group's own rows and `rows` those rows; all three are None when the
    batch already is D equal, contiguous groups with no base rows (then views suffice)."""

    size: int
    gather: torch.Tensor | None
    real: torch.Tensor | None
    rows: torch.Tensor | None

    @classmethod
    def of(cls, slots: list[int | None], distinct: list[int],
           device: torch.device) -> RowGroups:
        members = [[r for r, s in enumerate(slots) if s == slot] for slot in distinct]
        size = max(len(m) for m in members)
        if [r for m in members for r in m] == list(range(len(slots))) and all(
                len(m) == size for m in members):
            return cls(size, None, None, None)
        gather = [m[i] if i < len(m) else m[0] for m in members for i in range(size)]
        real = [d * size + i for d, m in enumerate(members) for i in range(len(m))]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(size, tensor(gather), tensor(real), tensor([r for m in members for r in m]))


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
        if ctx.single is None:
            if ctx.groups is None:
                return y
            if not self._segmented(x):  # batched matmuls: the forward's threads share groups
                return self._add_grouped(x, y)
        if ctx.threads == 1:
            return self._add_delta(x, y)
        torch.set_num_threads(1)  # thread-local (OpenMP and MKL), and cheap
        try:
            return self._add_delta(x, y)
        finally:
            torch.set_num_threads(ctx.threads)

    def _segmented(self, x: torch.Tensor) -> bool:
        segments = self.ctx.segments
        return segments is not None and (
            x.numel() >= SEGMENT_MIN_TOKENS * len(segments) * x.shape[-1])

    def _add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One adapter's delta for the whole batch, or one per adapter's contiguous rows."""
        ctx = self.ctx
        if ctx.single is not None:
            s = ctx.single
            xa = F.linear(x.to(self.a.dtype), self._a_of[s])
            return y.add_(F.linear(xa, self._b_of[s]), alpha=ctx.single_scale)
        assert ctx.segments is not None
        for slot, start, end, scale in ctx.segments:
            xa = F.linear(x[start:end].to(self.a.dtype), self._a_of[slot])
            y[start:end].add_(F.linear(xa, self._b_of[slot]), alpha=scale)
        return y

    def _add_grouped(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each adapter's delta on its own rows, all adapters in one batched matmul pair."""
        groups = self.ctx.groups
        assert groups is not None
        a, b = self.ctx.gathered(self)  # [D, in, R], [D, R, out]
        xs = x if groups.gather is None else x.index_select(0, groups.gather)
        delta = torch.bmm(torch.bmm(xs.to(a.dtype).reshape(a.shape[0], -1, a.shape[1]), a), b)
        if groups.gather is None:
            return y.add_(delta.view(y.shape))
        assert groups.real is not None and groups.rows is not None
        delta = delta.view(-1, *y.shape[1:]).index_select(0, groups.real)
        return y.index_add_(0, groups.rows, delta.to(y.dtype))


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
