"""Loading a many-tensor adapter: stored per tensor vs packed into one contiguous block.

The adapter puts LoRA on every expert of an MoE layer stack (gate/up/down projections of each
expert; 4 layers x 64 experts = 1,536 tensors by default). Both forms go through the engine's
own load path, `SlotLora.load_dir`, into a preallocated slot:
- per tensor: PEFT's `adapter_model.safetensors`, read, each tensor validated and copied into
  its place in the slot;
- packed: `adapter_model.packed.safetensors`, one block already in the slot's layout (ranks
  padded, a layout digest in the metadata), read and copied with a single `copy_`.
A per-tensor file of a float32 adapter at the slots' full rank is laid out like a slot row, so
`load_dir` reads it straight into the slot too (see `slots`): packing pays off for adapters
that need padding, which is the usual case: an engine's slots are sized for the largest rank
it serves (lorastream's worker engine: rank 8 slots for the default rank-4 policies; SGLang:
`--max-lora-rank`), so by default a rank-8 adapter loads into rank-16 slots (`--max-rank 8`
gives the no-padding case, where the two forms load alike). Medians over `--repeats` loads.
Last stdout line: `{"tensors", "rank", "max_rank", "per_tensor_s", "packed_s", "ratio"}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from workers.serving.slots import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, SlotLora

TARGETS = ("gate_proj", "up_proj", "down_proj")


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class MoEStack(nn.Module):
    """Only the expert linears matter here: the adapter's shape, not the routing."""

    def __init__(self, layers: int, experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(Expert(hidden, inter)
                                                    for _ in range(experts))})
            for _ in range(layers))


def write_adapter(model: nn.Module, out: Path, rank: int) -> int:
    """A PEFT-format adapter (random weights) on every expert linear; returns tensor count."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(
                rank, mod.in_features, generator=gen) * 0.01
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(
                mod.out_features, rank, generator=gen) * 0.01
    out.mkdir(parents=True)
    safetensors.torch.save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none"}
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return len(tensors)


def time_loads(slots: SlotLora, adapter_dir: Path, repeats: int) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        slots.load_dir(i % slots.num_slots, adapter_dir)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=16,
                        help="the slots' max rank (an engine serves every rank up to it)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.experts < 32:
        parser.error("the benchmark is defined for >= 32 experts")
    model = MoEStack(args.layers, args.experts, args.hidden, args.inter)
    with tempfile.TemporaryDirectory(prefix="packed-") as tmp:
        per_tensor, packed = Path(tmp) / "per-tensor", Path(tmp) / "packed"
        count = write_adapter(model, per_tensor, args.rank)
        write_adapter(model, packed, args.rank)
        slots = SlotLora.install(model, TARGETS, num_slots=4,
                                 max_rank=args.max_rank)
        slots.pack(packed)
        print(f"[packed] {count} tensors, {slots.layout.numel * 4 / 1e6:.1f} MB per slot",
              file=sys.stderr)
        slots.load_dir(0, per_tensor)
        slots.load_dir(1, packed)
        if not torch.equal(slots.storage[0], slots.storage[1]):
            raise SystemExit("packed and per-tensor loads disagree")
        per_tensor_s = time_loads(slots, per_tensor, args.repeats)
        print(f"[packed] per tensor: {per_tensor_s * 1e3:.2f} ms", file=sys.stderr)
        packed_s = time_loads(slots, packed, args.repeats)
        print(f"[packed] packed: {packed_s * 1e3:.2f} ms", file=sys.stderr)
    print(json.dumps({"tensors": count, "rank": args.rank, "max_rank": args.max_rank,
                      "per_tensor_s": round(per_tensor_s, 5), "packed_s": round(packed_s, 5),
                      "ratio": round(per_tensor_s / packed_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
