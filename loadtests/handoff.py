"""Handoff latency: how soon a new revision answers in the engine, merged vs adapter-only.

After one GRPO update on SmolLM2-135M (rollouts sampled from the CPU engine over SGLang's API),
the clock runs from "the trainer has new weights" to "the engine answered a request with them":

(a) merged: merge the LoRA into a copy of the base, save the full weights (safetensors,
    fsynced: a checkpoint that serves must survive a crash, the rule (b) follows too), start a
    new engine on them, first answer;
(b) adapter-only: export the adapter into the content-addressed store (fsynced), POST
    /load_lora_adapter (a safetensors read + copy into a preallocated slot), first answer.

Both engines are configured alike (bfloat16; `--engine-threads` sets the intra-op threads of
their model work, default torch's, see `EngineConfig.num_threads`), and the merge itself runs on
the process's default threads. The trainer's side (the GRPO step, the export, the merge) runs in
short-lived threads, never in the main one: in production the trainer is another process than
the engine, and a thread that ran parallel torch ops keeps an OpenMP team for its whole life,
which here would throttle the engine's model thread (see `workers.serving.cpu_engine`).
Each path is timed `--repeats` times; the medians are reported.
Progress goes to stderr; the last stdout line is one JSON object: `{"results": [{"rank",
"merged_s", "adapter_s", "ratio", "merged_bytes", "adapter_bytes", ...}, ...]}` (or just that
object with `--rank N`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import peft
import torch

from loadtests._smollm2 import smollm2_dir
from workers.artifacts.store import ArtifactStore, adapter_config, fsync_path
from workers.models.base import LoraSpec, load_base_model
from workers.reference.trainer import PolicyTrainer
from workers.serving.client import SGLangClient
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.server import ServerThread
from workers.training.grpo import TrainGroup

PROMPT = "What is the capital of France?"
FIRST_ANSWER = {"max_new_tokens": 1, "temperature": 0.0}


def log(msg: str) -> None:
    print(f"[handoff] {msg}", file=sys.stderr, flush=True)


DTYPE = "bfloat16"
"""Both paths serve in bfloat16, as SGLang does by default."""


_T = TypeVar("_T")


def trainer_side(fn: Callable[[], _T]) -> _T:
    """Run `fn` in a thread that exits afterwards (its OpenMP team goes with it)."""
    box: dict[str, _T] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=target, name="trainer-side")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box["out"]


def engine(base: Path, max_rank: int, threads: int | None) -> ServerThread:
    config = EngineConfig(base_path=base, max_loaded_loras=8, max_loras_per_batch=4,
                          max_lora_rank=max_rank, dtype=DTYPE, num_threads=threads)
    return ServerThread(CpuEngine(config))


def train_once(base: Path, lora: LoraSpec, client: SGLangClient) -> dict[str, torch.Tensor]:
    """One GRPO step on rollouts sampled by the engine (shorter completions rewarded)."""
    trainer = PolicyTrainer(base, lora, lr=5e-3)
    prompt_ids = trainer.tokenizer(PROMPT)["input_ids"]
    (group,) = client.sample([PROMPT], None, n=4, max_new_tokens=8, seed=1)
    rewards = [-float(len(g.token_ids)) + 0.1 * i for i, g in enumerate(group)]
    result = trainer.step("bench", [TrainGroup(prompt_ids, [g.token_ids for g in group],
                                               [g.logprobs for g in group], rewards)])
    log(f"rank {lora.rank}: GRPO step {result.step}, loss {result.loss:.4f}")
    return trainer.adapter_state("bench")


def adapter_path(store: ArtifactStore, tensors: dict[str, torch.Tensor], lora: LoraSpec,
                 base: Path, client: SGLangClient, name: str) -> tuple[float, int, list[int]]:
    started = time.perf_counter()
    ref = trainer_side(lambda: store.put_adapter(tensors, adapter_config(lora, str(base))))
    exported = time.perf_counter()
    client.load_lora_adapter(name, str(ref.path))
    loaded = time.perf_counter()
    (gen,) = client.generate(PROMPT, lora_path=name, sampling_params=FIRST_ANSWER)
    done = time.perf_counter()
    log(f"  export {exported - started:.3f} s, load {loaded - exported:.3f} s, "
        f"first answer {done - loaded:.3f} s")
    return done - started, ref.size_bytes, gen.token_ids


def merged_path(tensors: dict[str, torch.Tensor], lora: LoraSpec, base: Path,
                out: Path, threads: int | None) -> tuple[float, int, list[int]]:
    model, tokenizer = trainer_side(lambda: load_base_model(base))  # not timed: resident

    def merge_and_save() -> None:
        peft_model = peft.get_peft_model(model, lora.peft_config(model))
        peft.set_peft_model_state_dict(peft_model, tensors)
        merged = peft_model.merge_and_unload().to(getattr(torch, DTYPE))
        merged.save_pretrained(out)  # type: ignore[operator]  # safetensors, full weights
        tokenizer.save_pretrained(out)
        _fsync_tree(out)  # durable before it serves, as the artifact store makes the adapter

    started = time.perf_counter()
    trainer_side(merge_and_save)
    saved = time.perf_counter()
    with engine(out, lora.rank, threads) as server:
        ready = time.perf_counter()
        (gen,) = SGLangClient(server.url).generate(PROMPT, sampling_params=FIRST_ANSWER)
        elapsed = time.perf_counter() - started
    log(f"  merge+save {saved - started:.3f} s, engine reload {ready - saved:.3f} s, "
        f"first answer {started + elapsed - ready:.3f} s")
    return elapsed, sum(p.stat().st_size for p in out.glob("*.safetensors")), gen.token_ids


def _perturbed(tensors: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    return {k: (v + eps if k.endswith("lora_B.weight") else v) for k, v in tensors.items()}


def _fsync_tree(root: Path) -> None:
    """fsync every file, then the directory: the same durability the adapter export has."""
    for path in sorted(root.iterdir()):
        if path.is_file():
            fsync_path(path)
    fsync_path(root)


def run(rank: int, repeats: int, base: Path, work: Path,
        threads: int | None) -> dict[str, float | int | str | None]:
    """Alternate the two paths, so both see the same machine load (it drifts on shared CPUs)."""
    lora = LoraSpec(rank=rank, alpha=2.0 * rank)
    store = ArtifactStore(work / f"artifacts-r{rank}")
    adapter_runs, merged_runs = [], []
    with engine(base, rank, threads) as server:
        client = SGLangClient(server.url)
        tensors = trainer_side(lambda: train_once(base, lora, client))
        for i in range(repeats):
            # A fresh tiny perturbation per repeat: a new revision, a new content address.
            t = trainer_side(partial(_perturbed, tensors, i * 1e-7))
            adapter_runs.append(adapter_path(store, t, lora, base, client, f"bench@{rank}-{i}"))
            log(f"rank {rank}: adapter-only {adapter_runs[-1][0]:.3f} s")
            merged_runs.append(merged_path(tensors, lora, base, work / f"merged-r{rank}-{i}",
                                           threads))
            log(f"rank {rank}: merged {merged_runs[-1][0]:.3f} s")
    if merged_runs[0][2] != adapter_runs[0][2]:
        log(f"rank {rank}: note: first tokens differ {merged_runs[0][2]} vs "
            f"{adapter_runs[0][2]} (merging rounds differently)")
    merged_s = statistics.median(r[0] for r in merged_runs)
    adapter_s = statistics.median(r[0] for r in adapter_runs)
    return {"rank": rank, "dtype": DTYPE, "engine_threads": threads,
            "merged_s": round(merged_s, 4),
            "adapter_s": round(adapter_s, 4),
            "ratio": round(merged_s / adapter_s, 2), "merged_bytes": merged_runs[0][1],
            "adapter_bytes": adapter_runs[0][1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--rank", type=int, action="append", help="default: 8 and 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="intra-op threads of both engines' model work (default: torch's)")
    args = parser.parse_args(argv)
    base = smollm2_dir()
    ranks = args.rank or [8, 1]
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        results = [run(rank, args.repeats, base, Path(tmp), args.engine_threads)
                   for rank in ranks]
    for r in results:
        log(json.dumps(r))
    print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
