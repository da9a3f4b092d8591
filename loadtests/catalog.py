"""Catalog at scale: register N policies, resolve them over loopback, rebuild the index.

`python -m loadtests.catalog --policies 1000000 --json`

Each policy is registered the way the pipeline would leave it after its first promotion: an
identity record, revision 1 with provenance, an evaluation, the lifecycle moves exported →
evaluated → serving, and the `serving` alias (6 catalog records per policy). Records are built
with the real pydantic models, checked against the state machine, produced to the compacted
topic in batches (aiokafka), and indexed with the same `CatalogIndex.apply` the writer uses, at
the offsets Kafka assigned. Then:

- resolve: `CatalogIndex.resolve` (one EVALSHA round trip over loopback) for random policy ids;
- redis bytes per policy: growth of Redis `used_memory` over the registration, divided by N;
- rebuild: `workers.catalog.log.rebuild` (drop every index key, refold from the topic), timed.

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from typing import Any, cast

import orjson
import redis

from infra import admin
from infra.settings import Settings
from schemas.catalog import (
    AliasMoved,
    CatalogRecord,
    LoraConfig,
    OffsetRange,
    PolicyRegistered,
    Provenance,
    RevisionEvaluated,
    RevisionRecorded,
    RevisionStateChanged,
)
from workers.catalog.index import CatalogIndex
from workers.catalog.lifecycle import RevisionState, check_transition, partition_for
from workers.catalog.log import rebuild

BATCH_POLICIES = 2000
BASE_HASH = "5e" * 32
S = RevisionState


def log(msg: str) -> None:
    print(f"[catalog-bench] {msg}", file=sys.stderr, flush=True)


def policy_records(i: int, now: float) -> list[CatalogRecord]:
    """One policy's records up to its first promotion, with realistic provenance."""
    pid = f"user-{i:07d}"
    sha = f"{i:064x}"
    offsets = tuple(40 * i + k for k in (0, 3, 7, 9))
    prov = Provenance(
        parent_revision=0, base_model_hash=BASE_HASH, trainer_version="lorastream 0.1.0",
        hyperparameters={"learning_rate": 0.01, "group_size": 6, "lora_rank": 4},
        reward_fns=({"name": "feedback", "version": 1},),  # type: ignore[arg-type]
        rollouts=(OffsetRange(topic="lorastream.rewards", partition=i % 4, first=offsets[0],
                              last=offsets[-1], offsets=offsets),),
        first_step=1, last_step=4, tokens=4 * 48, started_ts=now - 60, finished_ts=now)
    check_transition(S.EXPORTED, S.EVALUATED)
    check_transition(S.EVALUATED, S.SERVING)
    return [
        PolicyRegistered(policy_id=pid, namespace=f"tenant{i % 16}", base_model="tiny-llama",
                         base_model_hash=BASE_HASH,
                         lora=LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))),
        RevisionRecorded(policy_id=pid, revision=1, sha256=sha, size_bytes=70_000, step=4,
                         provenance=prov),
        RevisionEvaluated(policy_id=pid, revision=1, score=0.7, baseline_revision=0,
                          baseline_score=0.5, prompts=8, passed=True, reason="beats base"),
        RevisionStateChanged(policy_id=pid, revision=1, state="evaluated", previous="exported"),
        RevisionStateChanged(policy_id=pid, revision=1, state="serving", previous="evaluated"),
        AliasMoved(policy_id=pid, alias="serving", revision=1, previous=0, reason="promoted"),
    ]


async def register(settings: Settings, index: CatalogIndex, n: int, partitions: int) -> float:
    """Produce and index every policy's records; returns the seconds it took."""
    from aiokafka import AIOKafkaProducer

    topic = settings.topic("catalog")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                linger_ms=20, max_batch_size=1 << 20, max_request_size=8 << 20)
    await producer.start()
    started = time.perf_counter()
    now = time.time()
    inflight: list[list[tuple[int, list[dict[str, Any]], Any]]] = []
    try:
        for lo in range(0, n, BATCH_POLICIES):
            by_part: dict[int, list[tuple[bytes, bytes, dict[str, Any]]]] = {}
            for i in range(lo, min(n, lo + BATCH_POLICIES)):
                for rec in policy_records(i, now):
                    data = rec.model_dump(mode="json")
                    by_part.setdefault(partition_for(rec.policy_id, partitions), []).append(
                        (rec.key().encode(), orjson.dumps(data), data))
            inflight.append(await _send(producer, topic, by_part))
            if len(inflight) > 2:  # keep two rounds in flight while acks come back
                await _index(index, inflight.pop(0))
            if lo // BATCH_POLICIES % 50 == 0:
                rate = (lo + BATCH_POLICIES) / (time.perf_counter() - started)
                log(f"registered {lo + BATCH_POLICIES}/{n} ({rate:,.0f}/s)")
        for sends in inflight:
            await _index(index, sends)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def _send(producer: Any, topic: str,
                by_part: dict[int, list[tuple[bytes, bytes, dict[str, Any]]]]) -> list[Any]:
    """Hand one round to the producer as batches per partition; returns what to index."""
    sends: list[tuple[int, list[dict[str, Any]], Any]] = []
    for part, items in by_part.items():
        batch, datas = producer.create_batch(), cast("list[dict[str, Any]]", [])
        for key, value, data in items:
            if batch.append(key=key, value=value, timestamp=None) is None:
                sends.append((part, datas, await producer.send_batch(batch, topic,
                                                                     partition=part)))
                batch, datas = producer.create_batch(), []
                batch.append(key=key, value=value, timestamp=None)
            datas.append(data)
        sends.append((part, datas, await producer.send_batch(batch, topic, partition=part)))
    return sends


async def _index(index: CatalogIndex, sends: list[Any]) -> None:
    """Index each record at the offset Kafka gave it, once its batch is acked."""
    pipe = index.r.pipeline(transaction=False)
    for part, datas, fut in sends:
        meta = await fut  # acked: only now may the index point at these records
        for k, data in enumerate(datas):
            index.apply(pipe, data, part, meta.offset + k)
    pipe.execute()


def measure_resolves(index: CatalogIndex, n: int, count: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    ids = [f"user-{rng.randrange(n):07d}" for _ in range(count)]
    for pid in ids[:200]:  # warm up the connection and the script cache
        index.resolve(pid)
    times = []
    for pid in ids:
        t = time.perf_counter()
        res = index.resolve(pid)
        times.append((time.perf_counter() - t) * 1000)
        if res is None or res.revision != 1 or res.sha256 != f"{int(pid[5:]):064x}":
            raise AssertionError(f"wrong resolution for {pid}: {res}")
    return sorted(times)


def pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def run(policies: int, resolves: int, keep: bool) -> dict[str, Any]:
    tag = f"bench{uuid.uuid4().hex[:8]}"
    base = Settings()
    s = Settings(**{**base.model_dump(), "topic_prefix": f"{tag}.", "app_id": tag,
                    "redis_prefix": f"{tag}:"})
    admin.create_topics(s)
    r = redis.Redis.from_url(s.redis_url)
    index = CatalogIndex(s, r)
    try:
        used0 = r.info("memory")["used_memory"]
        secs = asyncio.run(register(s, index, policies, s.partitions))
        grown = r.info("memory")["used_memory"] - used0
        log(f"registered {policies} in {secs:.1f} s; redis grew {grown / 1e6:.1f} MB")
        times = measure_resolves(index, policies, resolves)
        before = [index.resolve(f"user-{i:07d}") for i in range(0, policies, 997)]
        log("rebuilding the index from the topic")
        report = rebuild(s, index, working_set=False, progress=log)
        after = [index.resolve(f"user-{i:07d}") for i in range(0, policies, 997)]
        if before != after or sum(1 for _ in index.policy_ids()) != policies:
            raise AssertionError("the rebuilt index differs from the one built while writing")
        log(f"rebuild: {report.as_dict()}")
        return {"policies": policies, "register_per_s": round(policies / secs, 1),
                "resolve_p50_ms": round(pct(times, 0.50), 4),
                "resolve_p99_ms": round(pct(times, 0.99), 4),
                "redis_bytes_per_policy": round(grown / policies, 1),
                "rebuild_s": round(report.seconds, 2)}
    finally:
        if not keep:
            log("cleaning up topics and keys")
            index.delete_all()
            admin.delete_topics(s, admin.list_topics(s, s.topic_prefix))
        r.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=100_000)
    parser.add_argument("--resolves", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the topic and Redis keys")
    parser.add_argument("--json", action="store_true", help="(the last line is always JSON)")
    args = parser.parse_args(argv)
    result = run(args.policies, args.resolves, args.keep)
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
