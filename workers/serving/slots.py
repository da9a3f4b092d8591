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
modules an adapter does not target stay zero in its slot. Fused routed-expert banks get expert
slots (`slot_experts`: peft's `target_parameters` layout or SGLang's per-expert one); what is
wrapped is what the architecture registry resolves for the engine's targets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import safetensors.torch
import torch
from torch import nn

from workers.models.registry import resolve
from workers.serving.slot_experts import (
    ExpertSpan,
    SlotExperts,
    expert_spans,
    fuse_per_expert,
    native_expert_tensor,
)
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
    experts: tuple[ExpertSpan, ...] = ()

    @classmethod
    def build(cls, modules: Iterable[tuple[str, nn.Linear]], max_rank: int,
              banks: Iterable[tuple[str, nn.Module]] = ()) -> SlotLayout:
        """Linear spans in the order safetensors stores an adapter's tensors (sorted by key),
        then the expert banks' spans."""
        spans, offset = [], 0
        for name, linear in sorted(modules, key=lambda m: weight_key(m[0], "A")):
            a_off, b_off = offset, offset + max_rank * linear.in_features
            offset = b_off + linear.out_features * max_rank
            spans.append(ModuleSpan(name, linear.in_features, linear.out_features, a_off, b_off))
        experts, offset = expert_spans(list(banks), max_rank, offset)
        return cls(tuple(spans), max_rank, offset, tuple(experts))

    def signature(self) -> str:
        """Short digest of the geometry, stored in packed files to refuse a mismatched pack."""
        text = json.dumps([self.max_rank, [(s.name, s.in_features, s.out_features)
                                           for s in self.spans],
                           [(s.name, s.param, s.experts, s.in_features, s.out_features)
                            for s in self.experts]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class SlotLora:
    """Owns the slot storage of one model; `install` wraps its target linears once."""

    def __init__(self, layout: SlotLayout, num_slots: int, dtype: torch.dtype = SLOT_DTYPE,
                 device: torch.device | str = "cpu", banks: dict[str, nn.Module] | None = None
                 ) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.storage = torch.zeros(num_slots, layout.numel, dtype=dtype, device=device)
        self.ctx = SlotContext(torch.zeros(num_slots, dtype=dtype), layout.max_rank,
                               self.storage.device)
        self._spans = {s.name: s for s in layout.spans}
        self._expert_spans = {(s.name, s.param): s for s in layout.experts}
        self._banks = banks or {}
        direct = dtype == torch.float32 and not layout.experts and self.storage.device.type == "cpu"
        self._direct_header = self._expected_header() if direct else None

    @classmethod
    def install(cls, model: nn.Module, target_modules: Iterable[str], *, num_slots: int,
                max_rank: int) -> SlotLora:
        """Wrap what the registry resolves for `target_modules` (groups or leaf names)."""
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        targets = resolve(model, tuple(target_modules))
        linears = [(n, cast(nn.Linear, model.get_submodule(n))) for n in targets.linear_names]
        banks = {n: model.get_submodule(n) for n in targets.experts}
        device = next(model.parameters()).device
        self = cls(SlotLayout.build(linears, max_rank, banks.items()), num_slots,
                   device=device, banks=banks)
        for name, linear in linears:
            a, b = self.views(self._spans[name])
            _replace(model, name, SlotLinear(linear, a, b, self.ctx))
        for name, bank in banks.items():
            views = {p: self.expert_views(self._expert_spans[(name, p)])
                     for p in ("gate_up_proj", "down_proj")}
            _replace(model, name, SlotExperts(bank, views, self.ctx))
        return self

    def expert_views(self, span: ExpertSpan) -> tuple[torch.Tensor, torch.Tensor]:
        """A [slots, E, R, in] and B [slots, E, out, R] of one bank parameter."""
        r, e = self.layout.max_rank, span.experts
        a = self.storage[:, span.a_offset:span.b_offset].view(
            self.num_slots, e, r, span.in_features)
        b_end = span.b_offset + e * span.out_features * r
        b = self.storage[:, span.b_offset:b_end].view(self.num_slots, e, span.out_features, r)
        return a, b

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
        try:
            fused, rest = fuse_per_expert(tensors, self._banks)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise AdapterFormatError(f"per-expert adapter keys do not fit: {exc}") from exc
        plan: list[tuple[ModuleSpan | ExpertSpan, str, torch.Tensor]] = []
        for key, t in rest.items():
            plan.append(self._placement(key, t))
        for (bank, param, kind), t in fused.items():
            plan.append(self._expert_placement(f"{bank}.{param}", bank, param, kind, t))
        row = self.storage[slot]
        row.zero_()
        for span, kind, t in plan:
            if isinstance(span, ExpertSpan):
                a, b = self.expert_views(span)
                if kind == "A":
                    a[slot][:, : t.shape[1]].copy_(t)
                else:
                    b[slot][:, :, : t.shape[2]].copy_(t)
                continue
            a, b = self.views(span)
            if kind == "A":
                a[slot][: t.shape[0]].copy_(t)
            else:
                b[slot][:, : t.shape[1]].copy_(t)
        self.ctx.scales[slot] = scale

    def _placement(self, key: str, t: torch.Tensor
                   ) -> tuple[ModuleSpan | ExpertSpan, str, torch.Tensor]:
        name = key.removeprefix(PEFT_PREFIX)
        for kind in ("A", "B"):
            suffix = f".lora_{kind}.weight"
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            raise AdapterFormatError(f"not a LoRA A/B weight: {key}")
        bank = name.removesuffix(".base_layer")
        if bank in self._banks:  # peft target_parameters: gate_up innermost, down outermost
            param = "gate_up_proj" if name.endswith(".base_layer") else "down_proj"
            experts = self._expert_spans[(bank, param)].experts
            if t.dim() != 2:
                raise AdapterFormatError(f"{key}: expected a 2-D peft expert factor")
            return self._expert_placement(key, bank, param, kind,
                                          native_expert_tensor(param, kind, t, experts))
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

    def _expert_placement(self, key: str, bank: str, param: str, kind: str, t: torch.Tensor
                          ) -> tuple[ExpertSpan, str, torch.Tensor]:
        span = self._expert_spans[(bank, param)]
        r = t.shape[1] if kind == "A" else t.shape[2]
        want = ((span.experts, r, span.in_features) if kind == "A"
                else (span.experts, span.out_features, r))
        if tuple(t.shape) != want or r > self.layout.max_rank:
            raise AdapterFormatError(f"{key}: shape {tuple(t.shape)} does not fit {want} with "
                                     f"max rank {self.layout.max_rank}")
        return span, kind, t

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
        scratch = SlotLora(self.layout, 1, self.storage.dtype, banks=self._banks)
        scratch.load_tensors(0, tensors, 1.0)
        out = adapter_dir / PACKED_FILE
        safetensors.torch.save_file({PACKED_KEY: scratch.storage[0].contiguous()}, str(out),
                                    metadata={"layout": self.layout.signature()})
        return out


def _replace(model: nn.Module, name: str, wrapper: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)


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
