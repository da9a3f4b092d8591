"""Residency under a Zipf load: 100,000 addressable adapters, 2 CPU engines x 64 slots each.

Everything is real: Redis (own key prefix, removed afterwards), the artifact store, one
residency controller per engine, the router, and the CPU engines over HTTP (tiny base model, so
the figures are about placement and loading, not model speed). Every policy has a promoted
serving revision; `--distinct` different weight files back them (content addressing shares
identical bytes; each policy's serve name is still its own adapter to the engines).

Phases: (1) Zipf-distributed requests (`--requests`, `--concurrency` in flight) through the
router; a request is warm when its serving revision is active on an engine, else cold (the
router schedules a load and waits); (2) one wave: `--wave` policies promoted to a new revision
and each requested once, all at the same moment; `wave_s` is until the last one answered.
Last stdout line: {"addressable", "hit_rate", "cold_loads_per_s", "warm_p50_ms",
"warm_p99_ms", "cold_p50_ms", "cold_p99_ms", "wave_s"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import peft
import redis
import torch

from infra.settings import Settings
from schemas.catalog import (
    AliasMoved,
    CatalogRecord,
    LoraConfig,
    PolicyRegistered,
    Provenance,
    RevisionRecorded,
)
from workers.artifacts.store import ArtifactStore, adapter_config
from workers.catalog.index import CatalogIndex
from workers.models.base import LoraSpec, build_tiny_model, load_base_model
from workers.serving.client import AsyncSGLangClient
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.residency import ControllerConfig, ResidencyController
from workers.serving.router import Router
from workers.serving.server import ServerThread

PARAMS = {"max_new_tokens": 2, "temperature": 0.0}


def log(msg: str) -> None:
    print(f"[residency] {msg}", file=sys.stderr, flush=True)


def make_artifacts(base: Path, store: ArtifactStore, count: int) -> list[str]:
    model, _ = load_base_model(base)
    lora = LoraSpec(rank=2, alpha=4.0)
    template = peft.get_peft_model_state_dict(peft.get_peft_model(model, lora.peft_config(model)))
    gen = torch.Generator().manual_seed(0)
    return [store.put_adapter({k: torch.randn(v.shape, generator=gen) * 0.05
                               for k, v in template.items()},
                              adapter_config(lora, str(base))).sha256 for _ in range(count)]


LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",))
PROVENANCE = Provenance(parent_revision=0, base_model_hash="0" * 64, trainer_version="bench",
                        first_step=1, last_step=1, tokens=0, started_ts=0.0, finished_ts=0.0)


def serve(index: CatalogIndex, pipe: Any, policy: str, revision: int, sha: str) -> None:
    """Index a recorded and promoted revision exactly as the catalog writer does after Kafka
    acked its records (registration first); no broker, so 10^5 policies take seconds."""
    records: list[CatalogRecord] = []
    if revision == 1:
        records.append(PolicyRegistered(policy_id=policy, base_model="tiny",
                                        base_model_hash="0" * 64, lora=LORA))
    records += [
        RevisionRecorded(policy_id=policy, revision=revision, sha256=sha, size_bytes=1,
                         step=revision, provenance=PROVENANCE.model_copy(
                             update={"parent_revision": revision - 1})),
        AliasMoved(policy_id=policy, alias="serving", revision=revision,
                   previous=revision - 1),
    ]
    for record in records:
        index.apply(pipe, record.model_dump(mode="json"), 0, 0)


def populate(index: CatalogIndex, shas: list[str], n: int) -> None:
    """Record and promote one revision per policy, as the export and promote stages do."""
    pipe = index.r.pipeline(transaction=False)
    for i in range(n):
        serve(index, pipe, f"u{i}", 1, shas[i % len(shas)])
        if (i + 1) % 20000 == 0:
            pipe.execute()
            log(f"promoted {i + 1} policies")
    pipe.execute()


async def one(router: Router, clients: dict[str, AsyncSGLangClient], policy: str
              ) -> tuple[bool, float]:
    started = time.perf_counter()
    route = await router.route(policy)
    try:
        client = clients.setdefault(route.url, AsyncSGLangClient(route.url))
        await client.generate("hi", lora_path=route.serve_name, sampling_params=PARAMS)
    finally:
        router.release(route)
    return route.cold, (time.perf_counter() - started) * 1e3


async def zipf_phase(router: Router, policies: list[str], total: int, concurrency: int
                     ) -> list[tuple[bool, float]]:
    clients: dict[str, AsyncSGLangClient] = {}
    queue = list(reversed(policies[:total]))
    results: list[tuple[bool, float]] = []

    async def worker() -> None:
        while queue:
            results.append(await one(router, clients, queue.pop()))
            if len(results) % 500 == 0:
                log(f"{len(results)} requests")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    for c in clients.values():
        await c.close()
    return results


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


async def run(args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, object]:
    r = redis.Redis.from_url(settings.redis_url)
    index, store = CatalogIndex(settings, r), ArtifactStore(settings.artifacts)
    base = build_tiny_model(work / "tiny")
    shas = make_artifacts(base, store, args.distinct)
    started = time.perf_counter()
    populate(index, shas, args.addressable)
    log(f"{args.addressable} policies promoted in {time.perf_counter() - started:.1f} s")
    servers = [ServerThread(CpuEngine(EngineConfig(
        base_path=base, max_loaded_loras=args.slots, max_loras_per_batch=8, max_lora_rank=2)))
        .start() for _ in range(2)]
    ctls = [ResidencyController(settings, ControllerConfig(
        f"e{i}", s.url, capacity=args.slots, max_concurrent_loads=args.loads, interval_s=0.05),
        r) for i, s in enumerate(servers)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in ctls]
    router = Router(settings, r, cold_timeout_s=300.0)
    try:
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(args.addressable)
        ranks = np.minimum(rng.zipf(args.zipf, size=args.requests), args.addressable) - 1
        policies = [f"u{perm[k]}" for k in ranks]
        loads0, t0 = sum(c.loads_done for c in ctls), time.perf_counter()
        results = await zipf_phase(router, policies, args.requests, args.concurrency)
        phase_s = time.perf_counter() - t0
        cold_loads = sum(c.loads_done for c in ctls) - loads0
        wave_s = await wave(router, index, shas, args.wave, perm)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await router.close()
        for s in servers:
            s.stop()
    warm = [ms for cold, ms in results if not cold]
    cold = [ms for cold, ms in results if cold]
    return {"addressable": args.addressable, "hit_rate": round(len(warm) / len(results), 4),
            "cold_loads_per_s": round(cold_loads / phase_s, 2),
            "warm_p50_ms": pct(warm, 50), "warm_p99_ms": pct(warm, 99),
            "cold_p50_ms": pct(cold, 50), "cold_p99_ms": pct(cold, 99),
            "wave_s": round(wave_s, 3)}


async def wave(router: Router, index: CatalogIndex, shas: list[str], size: int,
               perm: np.ndarray) -> float:
    """Promote `size` policies to revision 2 and request each once, all at the same moment."""
    chosen = [f"u{p}" for p in perm[-size:]]  # the least popular: none is resident
    pipe = index.r.pipeline(transaction=False)
    for i, policy in enumerate(chosen):
        serve(index, pipe, policy, 2, shas[(i + 1) % len(shas)])
    pipe.execute()
    clients: dict[str, AsyncSGLangClient] = {}
    started = time.perf_counter()
    await asyncio.gather(*(one(router, clients, p) for p in chosen))
    elapsed = time.perf_counter() - started
    for c in clients.values():
        await c.close()
    log(f"wave of {size} activations answered in {elapsed:.2f} s")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--addressable", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--loads", type=int, default=4, help="concurrent loads per engine")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--wave", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tag = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="residency-") as tmp:
        settings = Settings(redis_prefix=f"{tag}:", data_dir=Path(tmp),
                            artifact_dir=Path(tmp) / "artifacts")
        try:
            out = asyncio.run(run(args, settings, Path(tmp)))
        finally:
            r = redis.Redis.from_url(settings.redis_url)
            keys = list(r.scan_iter(match=f"{tag}:*", count=5000))
            for i in range(0, len(keys), 5000):
                r.delete(*keys[i:i + 5000])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
