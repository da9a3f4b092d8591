"""Concurrent multi-policy GRPO vs one policy after another, on the tiny model and SmolLM2-135M.

The same GRPO work for K policies runs in two modes, each in a FRESH subprocess so neither's
memory or warm caches leak into the other's figures:
- sequential: for each policy in turn, sample its G completions of its prompts (one batched,
  KV-cached generate), score them, and take its GRPO step (`step_many({policy: groups})`);
- concurrent: one mixed-policy generate for all K policies, then ONE `step_many` over all K.
Identical work in both: the same prompts per policy, G, steps, LoRA rank, and exactly
`max_new_tokens` sampled tokens per completion (EOS does not stop a row, so token counts do not
depend on what was sampled). The default workload is the pipeline's own update unit: one ready
group per policy per step, with the pipeline's default G, max_new_tokens and rank (`Settings`).
Rollout sampling is part of the timed work; model load and one small warm-up step (the same in
both modes) are not. The trainer's memory policy is the same in both modes: a step packs its
policies into passes under `PASS_ACTIVATION_MB` of estimated activations
(`workers.training.multipass`; two policies a pass for SmolLM2 at the default workload, all eight
for the tiny model), each group's prompt runs once for its G completions
(`workers.training.sharedprefix`), and a pass over more than `CHECKPOINT_ABOVE_TOKENS` tokens
recomputes activations. Peak RSS is the child's own `ru_maxrss` from `os.wait4` (per process;
RUSAGE_CHILDREN would fold earlier children in).
With `--repeats N` the modes alternate N times (the machine may be shared) and the medians are
reported.

Progress goes to stderr. The last stdout lines are one JSON object per model size:
`{"model", "policies", "sequential_s", "concurrent_s", "speedup", "sequential_peak_rss_mb",
"concurrent_peak_rss_mb", "peak_rss_ratio"}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from infra.settings import REPO_ROOT

PROMPTS = ["What is 2+2?", "Say hi", "Name a color", "Count to three", "Spell cat",
           "Pick a fruit", "One word for sky", "Say yes or no", "Name a city", "Add 3 and 4",
           "Give me a verb", "Which is bigger, 5 or 9?", "A rhyme for hat", "Name a tool",
           "Say hello", "Name an animal"]


def _reward(token_ids: list[int]) -> float:
    """A cheap, deterministic, non-constant reward (share of even token ids)."""
    return sum(1 for t in token_ids if t % 2 == 0) / max(1, len(token_ids))


def _run(args: argparse.Namespace) -> dict[str, float]:
    """One mode in this process: load, warm up, then time `steps` rounds of sample + train."""
    import torch

    from workers.models.base import LoraSpec
    from workers.training.grpo import TrainGroup
    from workers.training.multitrainer import MultiPolicyTrainer

    torch.manual_seed(0)
    above = None if args.checkpoint_above < 0 else args.checkpoint_above
    trainer = MultiPolicyTrainer(Path(args.model), LoraSpec(rank=args.rank, alpha=2.0 * args.rank),
                                 lr=1e-3, gradient_checkpointing=args.checkpointing,
                                 checkpoint_above_tokens=above,
                                 pass_activation_mb=None if args.pass_mb < 0 else args.pass_mb)
    policies = [f"p{i}" for i in range(args.policies)]
    encode = trainer.tokenizer
    prompts = {p: [list(encode(PROMPTS[(i * args.prompts + j) % len(PROMPTS)])["input_ids"])
                   for j in range(args.prompts)] for i, p in enumerate(policies)}

    def rounds(names: list[str], seed: int) -> tuple[float, float]:
        """Sample then train `names` together (one pass each); returns (sample_s, train_s)."""
        t0 = time.perf_counter()
        out = trainer.sample_many([(ids, p, args.group) for p in names for ids in prompts[p]],
                                  max_new_tokens=args.max_new_tokens, seed=seed,
                                  stop_at_eos=False)
        t1 = time.perf_counter()
        it = iter(out)
        batches = {p: [TrainGroup(ids, [c.token_ids for c in g], [c.logprobs for c in g],
                                  [_reward(c.token_ids) for c in g])
                       for ids in prompts[p] for g in [next(it)]] for p in names}
        results = trainer.step_many(batches)
        bad = [p for p, r in results.items() if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"steps rejected for {bad}")
        return t1 - t0, time.perf_counter() - t1

    groups = [policies] if args.mode == "concurrent" else [[p] for p in policies]
    rounds([policies[0]], seed=12345)  # warm-up, identical in both modes
    sample_s = train_s = 0.0
    started = time.perf_counter()
    for step in range(args.steps):
        for names in groups:
            s, t = rounds(names, seed=step)
            sample_s, train_s = sample_s + s, train_s + t
    total = time.perf_counter() - started
    return {"seconds": total, "sample_s": sample_s, "train_s": train_s}


def _child(mode: str, model: Path, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Run one mode in a fresh process; returns its result and its own peak RSS in MiB."""
    cmd = [sys.executable, "-m", "loadtests.multipolicy", "--child", mode, "--model", str(model),
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in {"policies", "steps", "group", "prompts", "max_new_tokens", "rank",
                      "checkpoint_above", "pass_mb"}]]
    if args.checkpointing:
        cmd.append("--checkpointing")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None
    data = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run on {model} failed with exit code {proc.returncode}")
    result = json.loads(data.decode().strip().splitlines()[-1])
    return result, usage.ru_maxrss / 1024  # Linux reports KiB


def _models(names: list[str]) -> list[tuple[str, Path]]:
    from loadtests._smollm2 import smollm2_dir
    from workers.models.base import build_tiny_model

    paths = {"tiny": lambda: build_tiny_model(REPO_ROOT / ".data" / "models" / "tiny-llama"),
             "smollm2-135m": smollm2_dir}
    return [(name, paths[name]()) for name in names]


def main(argv: list[str] | None = None) -> None:
    from infra.settings import Settings
    from workers.training.multipass import PASS_ACTIVATION_MB
    from workers.training.multitrainer import CHECKPOINT_ABOVE_TOKENS

    defaults = Settings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON lines (always printed)")
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--policies", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--group", type=int, default=defaults.group_size,
                    help="G completions per prompt")
    ap.add_argument("--prompts", type=int, default=1, help="prompts (groups) per policy per step")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    ap.add_argument("--rank", type=int, default=defaults.lora_rank)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true",
                    help="gradient checkpointing on every pass, in both modes")
    ap.add_argument("--checkpoint-above", type=int, default=CHECKPOINT_ABOVE_TOKENS,
                    help="checkpoint passes over this many tokens (-1: never), both modes")
    ap.add_argument("--pass-mb", type=float, default=PASS_ACTIVATION_MB,
                    help="a joint step's activation budget per pass (-1: one pass), both modes")
    ap.add_argument("--child", choices=["sequential", "concurrent"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(_run(args)))
        return
    print(f"workload: K={args.policies} policies x {args.prompts} prompts x G={args.group}, "
          f"{args.max_new_tokens} new tokens, {args.steps} steps, rank {args.rank}, "
          f"checkpointing={args.checkpointing}, checkpoint_above={args.checkpoint_above}, "
          f"pass_mb={args.pass_mb}",
          file=sys.stderr)
    for name, path in _models(args.models.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {"sequential": [], "concurrent": []}
        for _ in range(args.repeats):
            for mode, got in runs.items():
                result, rss = _child(mode, path, args)
                got.append((result["seconds"], rss))
                print(f"{name} {mode}: {result} peak {rss:.0f} MiB", file=sys.stderr)
        seq = [statistics.median(x) for x in zip(*runs["sequential"], strict=True)]
        con = [statistics.median(x) for x in zip(*runs["concurrent"], strict=True)]
        print(json.dumps({
            "model": name, "policies": args.policies,
            "sequential_s": round(seq[0], 3), "concurrent_s": round(con[0], 3),
            "speedup": round(seq[0] / con[0], 3),
            "sequential_peak_rss_mb": round(seq[1], 1), "concurrent_peak_rss_mb": round(con[1], 1),
            "peak_rss_ratio": round(con[1] / seq[1], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
