"""Preallocated multi-slot LoRA: the fast adapter load path and mixed-adapter batching.

peft's `load_adapter` builds new modules and parameters for every adapter it attaches, which
costs far more than the few MB an adapter weighs. Here every target linear is wrapped once, at
engine start, by a `SlotLinear` whose A/B weights for all slots are views into one flat buffer
per slot. Loading an adapter is then a safetensors read plus `copy_` into a free slot (one
`copy_` for a packed adapter), and a batch can mix adapters: each row names its slot.

Adapters of rank < `max_rank` are zero-padded (exact: the extra rank components contribute 0);
modules an adapter does not target stay zero in its slot.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PACKED_FILE = "adapter_model.packed.safetensors"
PACKED_KEY = "packed"


class AdapterFormatError(ValueError):
    """The adapter cannot be served by this engine (format, rank, or target modules)."""


@dataclass(frozen=True)
class ModuleSpan:
    """Where one target linear's A [R, in] and B [out, R] live inside a slot's flat buffer."""

    name: str
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int


@dataclass(frozen=True)
class SlotLayout:
    """The fixed geometry of every slot; a packed adapter is valid only for the same layout."""

    spans: tuple[ModuleSpan, ...]
    max_rank: int
    numel: int

    @classmethod
    def build(cls, modules: Iterable[tuple[str, nn.Linear]], max_rank: int) -> SlotLayout:
        spans, offset = [], 0
        for name, linear in modules:
            a_off, b_off = offset, offset + max_rank * linear.in_features
            offset = b_off + linear.out_features * max_rank
            spans.append(ModuleSpan(name, linear.in_features, linear.out_features, a_off, b_off))
        return cls(tuple(spans), max_rank, offset)

    def signature(self) -> str:
        """Short digest of the geometry, stored in packed files to refuse a mismatched pack."""
        text = json.dumps([self.max_rank, [(s.name, s.in_features, s.out_features)
                                           for s in self.spans]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SlotContext:
    """Which slot each batch row uses; shared by every SlotLinear of one model."""

    def __init__(self, scales: torch.Tensor) -> None:
        self.scales = scales
        self.single: int | None = None  # every row uses this slot
        self.rows: torch.Tensor | None = None  # per-row slot (mixed batch)
        self.row_scales: torch.Tensor | None = None

    def set_rows(self, slots: list[int | None]) -> None:
        """Rows with None use the bare base model (their LoRA delta is scaled by 0)."""
        distinct = set(slots)
        self.rows = self.row_scales = None
        self.single = None
        if distinct == {None}:
            return
        if len(distinct) == 1:
            self.single = next(iter(distinct))
            return
        idx = torch.tensor([s if s is not None else 0 for s in slots], dtype=torch.long)
        scale = self.scales[idx].clone()
        scale[torch.tensor([s is None for s in slots])] = 0.0
        self.rows, self.row_scales = idx, scale

    def clear(self) -> None:
        self.set_rows([None])


class SlotLinear(nn.Module):
    """A frozen base linear plus the LoRA delta of the slot(s) the current batch uses."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, ctx: SlotContext):
        super().__init__()
        self.base = base
        self.a, self.b, self.ctx = a, b, ctx  # views into the slot storage, not parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.single is not None:
            s = ctx.single
            return y + (x @ self.a[s].T) @ self.b[s].T * ctx.scales[s]
        if ctx.rows is None or ctx.row_scales is None:
            return y
        a, b = self.a[ctx.rows], self.b[ctx.rows]  # [B, R, in], [B, out, R]
        xa = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))
        delta = torch.bmm(xa, b.transpose(1, 2)) * ctx.row_scales[:, None, None]
        return y + delta.reshape(y.shape)


def _targets(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    wanted = set(target_modules)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]
    if not found:
        raise ValueError(f"no nn.Linear named {sorted(wanted)} in the model")
    return found


class SlotLora:
    """Owns the slot storage of one model; `install` wraps its target linears once."""

    def __init__(self, layout: SlotLayout, num_slots: int, dtype: torch.dtype) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.storage = torch.zeros(num_slots, layout.numel, dtype=dtype)
        self.ctx = SlotContext(torch.zeros(num_slots, dtype=dtype))
        self._spans = {s.name: s for s in layout.spans}

    @classmethod
    def install(cls, model: nn.Module, target_modules: Iterable[str], *, num_slots: int,
                max_rank: int) -> SlotLora:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        targets = _targets(model, target_modules)
        dtype = targets[0][1].weight.dtype
        self = cls(SlotLayout.build(targets, max_rank), num_slots, dtype)
        for (name, linear), span in zip(targets, self.layout.spans, strict=True):
            a, b = self.views(span)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SlotLinear(linear, a, b, self.ctx))
        return self

    def views(self, span: ModuleSpan) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.layout.max_rank
        a = self.storage[:, span.a_offset:span.b_offset].view(self.num_slots, r, span.in_features)
        b_end = span.b_offset + span.out_features * r
        b = self.storage[:, span.b_offset:b_end].view(self.num_slots, span.out_features, r)
        return a, b

    # -- loading -----------------------------------------------------------------------------
    def load_dir(self, slot: int, adapter_dir: Path) -> None:
        """Load a PEFT adapter dir into `slot`, preferring a packed file of this layout."""
        adapter_dir = Path(adapter_dir)
        scale = adapter_scale(read_config(adapter_dir))
        packed = adapter_dir / PACKED_FILE
        if packed.is_file() and self._load_packed(slot, packed):
            self.ctx.scales[slot] = scale
            return
        tensors = safetensors.torch.load_file(str(adapter_dir / WEIGHTS_FILE), device="cpu")
        self.load_tensors(slot, tensors, scale)

    def load_tensors(self, slot: int, tensors: dict[str, torch.Tensor], scale: float) -> None:
        """Validate every tensor first, so a bad adapter never leaves a half-written slot."""
        self._check_slot(slot)
        plan = [self._placement(key, t) for key, t in tensors.items()]
        row = self.storage[slot]
        row.zero_()
        for span, kind, t in plan:
            a, b = self.views(span)
            dst = a[slot] if kind == "A" else b[slot]
            if kind == "A":
                dst[: t.shape[0]].copy_(t)
            else:
                dst[:, : t.shape[1]].copy_(t)
        self.ctx.scales[slot] = scale

    def _placement(self, key: str, t: torch.Tensor) -> tuple[ModuleSpan, str, torch.Tensor]:
        name = key.removeprefix(PEFT_PREFIX)
        for kind in ("A", "B"):
            suffix = f".lora_{kind}.weight"
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            raise AdapterFormatError(f"not a LoRA A/B weight: {key}")
        span = self._spans.get(name)
        if span is None:
            raise AdapterFormatError(f"adapter targets {name}, which this engine does not wrap")
        r = t.shape[0] if kind == "A" else t.shape[1]
        want = (r, span.in_features) if kind == "A" else (span.out_features, r)
        if t.dim() != 2 or tuple(t.shape) != want or r > self.layout.max_rank:
            raise AdapterFormatError(f"{key}: shape {tuple(t.shape)} does not fit "
                                     f"{want} with max rank {self.layout.max_rank}")
        return span, kind, t

    def _load_packed(self, slot: int, path: Path) -> bool:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("layout") != self.layout.signature():
                return False
            block = fh.get_tensor(PACKED_KEY)
        self._check_slot(slot)
        self.storage[slot].copy_(block)
        return True

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        self.storage[slot].zero_()
        self.ctx.scales[slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    def pack(self, adapter_dir: Path) -> Path:
        """Write the adapter as one contiguous block in this layout (adapter_dir/PACKED_FILE)."""
        adapter_dir = Path(adapter_dir)
        tensors = safetensors.torch.load_file(str(adapter_dir / WEIGHTS_FILE), device="cpu")
        scratch = SlotLora(self.layout, 1, self.storage.dtype)
        scratch.load_tensors(0, tensors, 1.0)
        out = adapter_dir / PACKED_FILE
        safetensors.torch.save_file({PACKED_KEY: scratch.storage[0].contiguous()}, str(out),
                                    metadata={"layout": self.layout.signature()})
        return out


def read_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"cannot read {CONFIG_FILE} in {adapter_dir}: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or config.get("use_dora"):
        raise AdapterFormatError("only plain LoRA adapters are supported (no DoRA)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterFormatError("rank_pattern/alpha_pattern are not supported")
    return config


def adapter_scale(config: dict[str, Any]) -> float:
    """peft's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
