"""The gateway's overhead, side by side with the engines: 1,000 policies, Zipf traffic.

Everything is real and in its own process, as in production: two `lorastream engine`
processes (CPU engine + residency controller, tiny base model, one intra-op thread each), one
`lorastream gateway`, Redis (own key prefix) and the broker (own topics), all removed
afterwards. Policies are promoted through the catalog index exactly as the writer applies its
records (no broker round trip per policy, as in `loadtests.residency`).

The engines first load the hot set they are assigned (`--slots` each; 512 holds all 1,000
policies, as a long-running deployment would; `--slots 64` shows the cold path too). Each of
`--concurrency` clients loops for `--warmup` + `--duration` seconds: pick a policy by
Zipf rank, ask the gateway (`/v1/chat/completions`, `--max-tokens`, temperature 0), then send the
same request straight to the engine that answered (its header names it) with the engine's own
model name for that revision: `direct_*` is what the same traffic costs without the gateway,
measured in the same run. Every `--feedback-every`-th answer is rated through `/v1/feedback`; a
consumer on `interactions` checks that each rating arrived and how long it took.
Last stdout line: {"policies", "requests", "requests_per_s", "p50_ms", "p99_ms",
"direct_p50_ms", "direct_p99_ms", "overhead_p50_ratio", "cold_waits", "errors",
"feedback_events", "feedback_to_interaction_p99_ms"}, plus "feedback_found", "max_tokens" and
the same ratio over warm requests only ("warm_p50_ms", "warm_direct_p50_ms",
"warm_overhead_p50_ratio"): a cold request's wait for its adapter is placement, not the
gateway's own cost, and the direct request after it always finds the adapter loaded. On a
shared machine latency ratios move with other processes' load, so it also reports CPU time per
request: the gateway process's ("gateway_cpu_ms_per_request") and the engines' per request they
answered, gateway and direct counted ("engine_cpu_ms_per_request").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import redis
from aiokafka import AIOKafkaConsumer

from infra.admin import create_topics, delete_topics, list_topics
from infra.process import stop_child
from infra.security import aiokafka_config
from infra.settings import REPO_ROOT, Settings, settings_env
from loadtests.residency import make_artifacts, pct, populate
from workers.artifacts.store import ArtifactStore
from workers.catalog.index import CatalogIndex
from workers.models.base import build_tiny_model
from workers.serving.assignment import engine_key, live_engines
from workers.serving.gateway.apikeys import ApiKeys


def log(msg: str) -> None:
    print(f"[gateway] {msg}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    gateway_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    warm_pairs: list[tuple[float, float]] = field(default_factory=list)
    cold: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    feedback_sent: dict[str, float] = field(default_factory=dict)
    feedback_seen: dict[str, float] = field(default_factory=dict)
    cpu_s: list[float] = field(default_factory=list)
    """CPU seconds over the measured window: gateway, engine 0, engine 1."""


def spawn(settings: Settings, args: list[str], log_path: Path,
          profile: str | None = None) -> subprocess.Popen[bytes]:
    # CPU time, not wall time: on a shared machine waiting is not the gateway's cost.
    cmd = ["-c", "import cProfile, sys, time; from streams.cli.main import main; "
           "p = cProfile.Profile(time.process_time); p.runcall(main, sys.argv[2:]); "
           "p.dump_stats(sys.argv[1])", profile] if profile else ["-m", "streams.cli"]
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, *cmd, *args],
                                env={**os.environ, **settings_env(settings)}, cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


async def wait_http(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.2)


async def follow_feedback(settings: Settings, tally: Tally, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(settings.topic("interactions"), **aiokafka_config(settings),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for rec in records:
                    answer = json.loads(rec.value).get("answer_id")
                    if answer:
                        tally.feedback_seen.setdefault(answer, now)
    finally:
        await consumer.stop()


async def client_loop(args: argparse.Namespace, gw: str, key: str, engines: dict[str, str],
                      bases: dict[str, str], policies: list[str], tally: Tally,
                      t_measure: float, t_end: float) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    i = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        while time.perf_counter() < t_end:
            policy = policies[i % len(policies)]
            i += 1
            body = {"model": policy, "max_tokens": args.max_tokens, "temperature": 0.0,
                    "messages": [{"role": "user", "content": f"hello {i % 7}"}]}
            started = time.perf_counter()
            async with s.post(f"{gw}/v1/chat/completions", json=body, headers=headers) as r:
                out = await r.json()
                status, engine = r.status, r.headers.get("x-lorastream-engine", "")
                cold = float(r.headers.get("x-lorastream-cold-wait-ms", "0")) > 0
            gw_ms = (time.perf_counter() - started) * 1e3
            measuring = started >= t_measure
            if status != 200:
                if measuring:
                    tally.errors += 1
                    tally.error_samples = [*tally.error_samples, str(out)][:5]
                continue
            direct = {**body, "model": f"{bases[engine]}:{out['model']}"}
            started = time.perf_counter()
            async with s.post(f"{engines[engine]}/v1/chat/completions", json=direct) as r:
                await r.read()
                direct_ok = r.status == 200
            direct_ms = (time.perf_counter() - started) * 1e3
            if not measuring:
                continue
            tally.gateway_ms.append(gw_ms)
            tally.cold += cold
            if direct_ok:
                tally.direct_ms.append(direct_ms)
                if not cold:
                    tally.warm_pairs.append((gw_ms, direct_ms))
            else:
                tally.errors += 1
            if len(tally.gateway_ms) % args.feedback_every == 0:
                sent = time.perf_counter()
                async with s.post(f"{gw}/v1/feedback", headers=headers,
                                  json={"id": out["id"], "score": 1.0}) as r:
                    if r.status == 200:
                        tally.feedback_sent[out["id"]] = sent
                    else:
                        tally.errors += 1


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: its cost independent of how busy the
    machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def traffic(args: argparse.Namespace, settings: Settings, gw: str, key: str,
                  pids: list[int]) -> Tally:
    r = redis.Redis.from_url(settings.redis_url)
    engines = live_engines(settings, r)
    bases: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        for engine, url in engines.items():
            async with s.get(f"{url}/v1/models") as resp:
                bases[engine] = (await resp.json())["data"][0]["id"]
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(args.policies)
    ranks = np.minimum(rng.zipf(args.zipf, size=200_000), args.policies) - 1
    tally, stop = Tally(), asyncio.Event()
    consumer = asyncio.create_task(follow_feedback(settings, tally, stop))
    now = time.perf_counter()
    t_measure, t_end = now + args.warmup, now + args.warmup + args.duration
    streams = [[f"u{perm[k]}" for k in ranks[j::args.concurrency]]
               for j in range(args.concurrency)]
    loops = asyncio.gather(*(client_loop(args, gw, key, engines, bases, streams[j], tally,
                                         t_measure, t_end) for j in range(args.concurrency)))
    await asyncio.sleep(args.warmup)
    before = [cpu_s(p) for p in pids]
    await loops
    tally.cpu_s = [cpu_s(p) - b for p, b in zip(pids, before, strict=True)]
    deadline = time.monotonic() + 60
    while (set(tally.feedback_sent) - set(tally.feedback_seen)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await consumer
    return tally


async def preload(settings: Settings, r: redis.Redis, want: int, timeout: float = 600) -> float:
    """Wait until the controllers have loaded the hot set they were assigned (every serving
    revision, up to the engines' slots): the working set a long-running deployment holds."""
    started, deadline = time.perf_counter(), time.monotonic() + timeout
    while True:
        active = sum(sum(v == b"active" for v in r.hvals(  # type: ignore[union-attr]
            engine_key(settings, e, "states"))) for e in live_engines(settings, r))
        if active >= want or time.monotonic() > deadline:
            log(f"{active} adapters active after {time.perf_counter() - started:.1f} s")
            return time.perf_counter() - started
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, settings: Settings, work: Path) -> dict[str, object]:
    r = redis.Redis.from_url(settings.redis_url)
    base = build_tiny_model(work / "tiny")
    shas = make_artifacts(base, ArtifactStore(settings.artifacts), args.distinct)
    populate(CatalogIndex(settings, r), shas, args.policies)
    key, _ = ApiKeys(settings, r).create("default", "bench")
    procs = []
    try:
        for i, port in enumerate((args.port + 1, args.port + 2)):
            procs.append(spawn(settings, [
                "engine", "--port", str(port), "--engine-id", f"e{i}", "--base-model", str(base),
                "--max-loaded-loras", str(args.slots), "--max-loras-per-batch", "8",
                "--max-lora-rank", "2", "--num-threads", "1"], work / f"engine{i}.log"))
        procs.append(spawn(settings, ["gateway", "--port", str(args.port)], work / "gw.log",
                           args.profile))
        gw = f"http://127.0.0.1:{args.port}"
        for port in (args.port + 1, args.port + 2):
            await wait_http(f"http://127.0.0.1:{port}/health")
        await wait_http(f"{gw}/health")
        while len(live_engines(settings, r)) < 2:
            await asyncio.sleep(0.1)
        preload_s = await preload(settings, r, min(args.policies, 2 * args.slots))
        log(f"{args.policies} policies, 2 engines, gateway up; {args.warmup}+{args.duration} s")
        tally = await traffic(args, settings, gw, key, [procs[2].pid, procs[0].pid,
                                                        procs[1].pid])
    finally:
        for proc in procs:
            stop_child(proc, 15)
    if tally.error_samples:
        log(f"errors, e.g.: {tally.error_samples}")
    p50, d50 = pct(tally.gateway_ms, 50), pct(tally.direct_ms, 50)
    n = len(tally.gateway_ms)
    warm_gw = pct([g for g, _ in tally.warm_pairs], 50)
    warm_direct = pct([d for _, d in tally.warm_pairs], 50)
    lags = [(tally.feedback_seen[a] - t) * 1e3 for a, t in tally.feedback_sent.items()
            if a in tally.feedback_seen]
    return {"policies": args.policies, "requests": len(tally.gateway_ms),
            "slots_per_engine": args.slots, "preload_s": round(preload_s, 1),
            "requests_per_s": round(len(tally.gateway_ms) / args.duration, 1),
            "p50_ms": p50, "p99_ms": pct(tally.gateway_ms, 99),
            "direct_p50_ms": d50, "direct_p99_ms": pct(tally.direct_ms, 99),
            "overhead_p50_ratio": round(p50 / d50, 3) if d50 else None,
            "cold_waits": tally.cold, "errors": tally.errors,
            "feedback_events": len(tally.feedback_sent), "feedback_found": len(lags),
            "feedback_to_interaction_p99_ms": pct(lags, 99), "max_tokens": args.max_tokens,
            "warm_p50_ms": warm_gw, "warm_direct_p50_ms": warm_direct,
            "warm_overhead_p50_ratio": round(warm_gw / warm_direct, 3) if warm_direct else None,
            "gateway_cpu_ms_per_request": round(tally.cpu_s[0] * 1e3 / n, 2) if n else None,
            "engine_cpu_ms_per_request": round(sum(tally.cpu_s[1:]) * 1e3 / (2 * n), 2)
            if n else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=16)
    parser.add_argument("--slots", type=int, default=512,
                        help="adapters per engine (512: all 1,000 policies resident)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--feedback-every", type=int, default=10)
    parser.add_argument("--port", type=int, default=18800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="run the gateway under cProfile, writing this file")
    args = parser.parse_args(argv)
    tag = f"gwbench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="gateway-") as tmp:
        settings = Settings(redis_prefix=f"{tag}:", topic_prefix=f"{tag}.", app_id=tag,
                            data_dir=Path(tmp), artifact_dir=Path(tmp) / "artifacts")
        create_topics(settings)
        try:
            out = asyncio.run(run(args, settings, Path(tmp)))
        finally:
            delete_topics(settings, list_topics(settings, settings.topic_prefix))
            r = redis.Redis.from_url(settings.redis_url)
            keys = list(r.scan_iter(match=f"{tag}:*", count=5000))
            for i in range(0, len(keys), 5000):
                r.delete(*keys[i:i + 5000])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
