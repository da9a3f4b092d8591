"""Reading the catalog topic: exact records by offset (for the CLI), and the full rebuild.

The rebuild is the proof that Redis is only an index: it drops the index, reads the compacted
topic from the beginning to the end offsets it saw when it started, and re-applies every record
with the same `CatalogIndex.apply` the writer uses. It uses aiokafka (batched fetches, C record
parsing), because 10^6 policies mean several million records, and writes to Redis in large
pipelines. Afterwards it re-derives the pipeline's working set from the folded aliases.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from infra.admin import client_config
from infra.settings import Settings
from workers.catalog.index import CatalogIndex

PIPELINE_BATCH = 20_000


def fetch_at(settings: Settings, partition: int, offsets: Iterable[int],
             timeout_s: float = 10.0) -> dict[int, bytes]:
    """The values at exactly these offsets of one catalog partition (compacted-away ones are
    simply missing from the answer)."""
    want = sorted(set(offsets))
    got: dict[int, bytes] = {}
    if not want:
        return got
    tp = TopicPartition(settings.topic("catalog"), partition)
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, group_id=None,
                             fetch_max_wait_ms=100, consumer_timeout_ms=1000)
    try:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        pending = [o for o in want if o < end]
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            consumer.seek(tp, pending[0])
            batch = consumer.poll(timeout_ms=500, max_records=500).get(tp, [])
            if not batch:
                continue
            for rec in batch:
                if rec.offset in pending:
                    got[rec.offset] = rec.value
            last = batch[-1].offset
            pending = [o for o in pending if o > last]
    finally:
        consumer.close()
    return got


@dataclass
class RebuildReport:
    records: int = 0
    policies: int = 0
    deleted_keys: int = 0
    seconds: float = 0.0
    skipped: int = 0
    heldout: int = 0
    paused: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def rebuild(settings: Settings, index: CatalogIndex | None = None, *, working_set: bool = True,
            progress: Callable[[str], None] | None = None) -> RebuildReport:
    """Drop the catalog index and refold it from the compacted topic (the hot set is derived
    from its serving aliases); returns counts and time. With `working_set`, also replay the
    pipeline's held-out prompts and pauses from their topics (`workers/pipeline/replay.py`)."""
    index = index or CatalogIndex(settings)
    started = time.perf_counter()
    report = RebuildReport(deleted_keys=index.delete_all())
    asyncio.run(_refold(settings, index, report, progress or _stderr))
    report.policies = index.restore_hot_set()
    if working_set:
        from workers.pipeline.replay import replay_heldout, replay_pauses

        report.heldout = replay_heldout(settings, progress=progress or _stderr)
        report.paused = len(replay_pauses(settings))
    report.seconds = time.perf_counter() - started
    return report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _refold(settings: Settings, index: CatalogIndex, report: RebuildReport,
                  progress: Callable[[str], None]) -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as ATP

    from infra.security import aiokafka_config

    topic = settings.topic("catalog")
    consumer = AIOKafkaConsumer(
        **aiokafka_config(settings), enable_auto_commit=False, group_id=None,
        auto_offset_reset="earliest", max_partition_fetch_bytes=16 << 20,
        fetch_max_bytes=64 << 20, check_crcs=False,
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()  # no public call refreshes it
        parts = [ATP(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist")
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        pipe = index.r.pipeline(transaction=False)
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=50_000)
            for tp, recs in batches.items():
                _apply_batch(index, pipe, tp.partition, recs, remaining[tp], report)
                if recs and recs[-1].offset + 1 >= remaining[tp]:
                    del remaining[tp]
            if len(pipe) >= PIPELINE_BATCH:
                pipe.execute()
                progress(f"rebuild: {report.records} records")
            if not batches and all([await _at_end(consumer, tp, e)
                                    for tp, e in remaining.items()]):
                break
        pipe.execute()
    finally:
        await consumer.stop()


async def _at_end(consumer: Any, tp: Any, end: int) -> bool:
    """Compaction can leave the last offsets before `end` empty: then nothing more comes."""
    return await consumer.position(tp) >= end


def _apply_batch(index: CatalogIndex, pipe: Any, partition: int, recs: list[Any], end: int,
                 report: RebuildReport) -> None:
    """Index a fetched batch: records of one policy merge into one HSET (they arrive in order,
    so later fields overwrite earlier ones exactly as applying them one by one would)."""
    merged: dict[str, dict[str, Any]] = {}
    for rec in recs:
        if rec.offset >= end:
            break
        try:
            data = orjson.loads(rec.value) if rec.value is not None else None
            if not isinstance(data, dict) or "policy_id" not in data:
                raise ValueError("not a catalog record")
            key, fields = index.fields_for(pipe, data, partition, rec.offset)
        except (ValueError, KeyError, TypeError):
            report.skipped += 1
            continue
        report.records += 1
        if fields:
            merged.setdefault(key, {}).update(fields)
    for key, fields in merged.items():
        pipe.hset(key, mapping=fields)
