"""Every registry family end to end on its tiny base: oracle, frozen base, reload, engine.

`python -m loadtests.architectures --json`

For each family a tiny random base is built from its transformers config (no download) and:
- `oracle_max_abs_err`: the multi-policy LoRA layer (ranks 1 and 8 and a base row in one pass)
  against peft's per-adapter passes in float64, logits and gradients (gradients relative to
  their largest entry; routers compute in float32 by design);
- two policies train `--steps` joint GRPO steps on their own samples (float32, the pipeline's
  trainer at its default learning rate, `--lr`); `frozen_unchanged`: every base parameter and
  buffer is bit-identical afterwards;
- `peft_reload_max_abs_err`: a policy's export reloaded by plain `PeftModel.from_pretrained`
  against the trainer's logits;
- `engine_max_abs_err`: the CPU engine serving both revisions and the base in one mixed,
  left-padded batch against the trainer's log-probs of the same tokens (its plain forward,
  and the packed GRPO pass that trains on those rollouts);
- `step_s`: the median joint step (two policies, sampling excluded); `adapter_bytes`: one
  exported revision's weights file; `params`: the base's parameter count; `lora_targets`: the
  modules each target group resolved to.
Targets: oracle <= 1e-6, reload and engine <= 1e-5, frozen_unchanged true, every family.
Last stdout line: `{"families": [{"arch", "params", "lora_targets", "oracle_max_abs_err",
"peft_reload_max_abs_err", "engine_max_abs_err", "frozen_unchanged", "step_s",
"adapter_bytes"}]}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workers.models.tiny import ARCHES, build_tiny
from workers.reference.families import (
    engine_error,
    export_dir,
    oracle_error,
    reload_error,
    train_two,
)


def measure(arch: str, root: Path, *, steps: int, hidden: int, lr: float) -> dict[str, Any]:
    base = build_tiny(arch, root / arch, hidden_size=hidden)
    oracle = oracle_error(base)
    times: list[float] = []
    trainer, frozen, _ = train_two(base, steps=steps, lr=lr, step_times=times)
    adapter = export_dir(trainer, "a", base, root / f"{arch}-adapter")
    return {
        "arch": arch,
        "params": sum(p.numel() for n, p in trainer.base.named_parameters()
                      if "lora_" not in n),
        "lora_targets": trainer.multi.targets.groups(),
        "oracle_max_abs_err": oracle,
        "peft_reload_max_abs_err": reload_error(trainer, base),
        "engine_max_abs_err": engine_error(trainer, base),
        "frozen_unchanged": frozen,
        "step_s": round(statistics.median(times[1:] or times), 4),
        "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


def passes(row: dict[str, Any]) -> bool:
    return (row["oracle_max_abs_err"] <= 1e-6 and row["peft_reload_max_abs_err"] <= 1e-5
            and row["engine_max_abs_err"] <= 1e-5 and row["frozen_unchanged"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--arch", action="append", choices=ARCHES,
                        help="only these families (repeatable; default: all)")
    parser.add_argument("--steps", type=int, default=4, help="joint GRPO steps per family")
    parser.add_argument("--hidden", type=int, default=64, help="tiny bases' hidden size")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (the pipeline's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHES:
            started = time.perf_counter()
            row = measure(arch, Path(tmp), steps=args.steps, hidden=args.hidden, lr=args.lr)
            rows.append(row)
            print(f"[architectures] {arch}: {'ok' if passes(row) else 'FAILS TARGETS'} "
                  f"({time.perf_counter() - started:.1f} s) {row}", file=sys.stderr, flush=True)
    print(json.dumps({"families": rows}))
    return 0 if all(passes(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
