"""Preallocated multi-slot LoRA: the fast adapter load path and mixed-adapter batching.

peft's `load_adapter` builds new modules and parameters for every adapter it attaches, which
costs far more than the few MB an adapter weighs. Here every target linear is wrapped once, at
engine start, by a `SlotLinear` whose A/B weights for all slots are views into one flat float32
buffer per slot. Loading an adapter is then a read into a free slot, and a batch can mix
adapters: each row names its slot (the math is in `slot_linear`).

The slot layout orders the modules as a safetensors file orders its tensors (by name, A before
B), so a float32 PEFT file at full rank that targets every wrapped module has a data section
that *is* a slot row byte for byte: it is validated from its header and read straight into the
slot (one `readinto`, no tensor objects). Any other adapter takes the per-tensor path:
adapters of rank < `max_rank` are zero-padded (exact: the extra rank components contribute 0);
modules an adapter does not target stay zero in its slot.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from torch import nn

from workers.serving.slot_linear import SlotContext, SlotLinear

PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PACKED_FILE = "adapter_model.packed.safetensors"
PACKED_KEY = "packed"
SLOT_DTYPE = torch.float32
"""LoRA factors stay float32 whatever the base dtype: see `slot_linear`."""
_MAX_HEADER = 64 * 1024 * 1024


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
        """Spans in the order safetensors stores an adapter's tensors (sorted by key)."""
        spans, offset = [], 0
        for name, linear in sorted(modules, key=lambda m: weight_key(m[0], "A")):
            a_off, b_off = offset, offset + max_rank * linear.in_features
            offset = b_off + linear.out_features * max_rank
            spans.append(ModuleSpan(name, linear.in_features, linear.out_features, a_off, b_off))
        return cls(tuple(spans), max_rank, offset)

    def signature(self) -> str:
        """Short digest of the geometry, stored in packed files to refuse a mismatched pack."""
        text = json.dumps([self.max_rank, [(s.name, s.in_features, s.out_features)
                                           for s in self.spans]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _targets(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    wanted = set(target_modules)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]
    if not found:
        raise ValueError(f"no nn.Linear named {sorted(wanted)} in the model")
    return found


class SlotLora:
    """Owns the slot storage of one model; `install` wraps its target linears once."""

    def __init__(self, layout: SlotLayout, num_slots: int,
                 dtype: torch.dtype = SLOT_DTYPE) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.storage = torch.zeros(num_slots, layout.numel, dtype=dtype)
        self.ctx = SlotContext(torch.zeros(num_slots, dtype=dtype), layout.max_rank)
        self._spans = {s.name: s for s in layout.spans}
        self._direct_header = self._expected_header() if dtype == torch.float32 else None

    @classmethod
    def install(cls, model: nn.Module, target_modules: Iterable[str], *, num_slots: int,
                max_rank: int) -> SlotLora:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        targets = _targets(model, target_modules)
        self = cls(SlotLayout.build(targets, max_rank), num_slots)
        for name, linear in targets:
            a, b = self.views(self._spans[name])
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
        weights = adapter_dir / WEIGHTS_FILE
        if self._load_direct(slot, weights):
            self.ctx.scales[slot] = scale
            return
        tensors = safetensors.torch.load_file(str(weights), device="cpu")
        self.load_tensors(slot, tensors, scale)

    def _expected_header(self) -> dict[str, dict[str, Any]]:
        """The safetensors header entries of a file whose data section is one slot row."""
        r, out = self.layout.max_rank, {}
        for s in self.layout.spans:
            b_end = s.b_offset + s.out_features * r
            out[weight_key(s.name, "A")] = {"dtype": "F32", "shape": [r, s.in_features],
                                            "data_offsets": [4 * s.a_offset, 4 * s.b_offset]}
            out[weight_key(s.name, "B")] = {"dtype": "F32", "shape": [s.out_features, r],
                                            "data_offsets": [4 * s.b_offset, 4 * b_end]}
        return out

    def _load_direct(self, slot: int, path: Path) -> bool:
        """Read the file's data section straight into the slot when its header says the data
        is exactly a slot row (checked entry by entry before a byte of the slot changes);
        False, untouched, for any other adapter."""
        if self._direct_header is None:
            return False
        self._check_slot(slot)
        with path.open("rb", buffering=0) as fh:
            header = read_header(fh, path)
            header.pop("__metadata__", None)
            if header != self._direct_header:
                return False
            row = self.storage[slot].numpy().data.cast("B")
            done = 0
            while done < len(row):
                n = fh.readinto(row[done:])
                if not n:
                    self.clear(slot)
                    raise AdapterFormatError(f"{path}: truncated after {done} data bytes")
                done += n
        return True

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


def weight_key(module: str, kind: str) -> str:
    """PEFT's key of a module's LoRA factor (`kind` is "A" or "B") in adapter_model.*."""
    return f"{PEFT_PREFIX}{module}.lora_{kind}.weight"


def read_header(fh: BinaryIO, path: Path) -> dict[str, Any]:
    """A safetensors header (8-byte little-endian length, then JSON); leaves `fh` at the data."""
    size = int.from_bytes(fh.read(8), "little")
    raw = fh.read(size) if 0 < size <= _MAX_HEADER else b""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise AdapterFormatError(f"{path} is not a safetensors file: {exc}") from exc
    if len(raw) != size or not isinstance(header, dict):
        raise AdapterFormatError(f"{path} is not a safetensors file")
    return header


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
