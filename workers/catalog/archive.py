"""Provenance that outlives retention: the records a revision was trained on, copied into the
artifact store when the revision is recorded.

A revision's provenance names the exact `rewards` messages its steps consumed (each embeds its
rollout and interaction), but topics keep a week. The export stage records a revision seconds
after its steps, well within retention, so it reads those messages then and writes them as one
JSON-lines file, `provenance/<policy>/<last step>.jsonl` (shared copy included); the provenance
names the file and its sha256. Following a revision back to its interaction logs then needs the
artifact store only (`interactions`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from infra.security import kafka_python_config
from infra.settings import Settings
from schemas.catalog import OffsetRange, Provenance
from schemas.events import InteractionLogged, RolloutRewarded
from workers.artifacts.store import ArtifactStore

log = logging.getLogger(__name__)
ARCHIVE_DIR = "provenance"


@dataclass(frozen=True)
class Archived:
    location: str
    sha256: str
    records: int


class RecordReader:
    """Reads messages by exact position, without a consumer group (one per process)."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = KafkaConsumer(**kafka_python_config(settings), enable_auto_commit=False,
                                       auto_offset_reset="earliest", request_timeout_ms=30000)
        self._lock = threading.Lock()

    def read(self, ranges: Sequence[OffsetRange], timeout_s: float = 30.0
             ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._lock:
            for rng in ranges:
                out += self._read_range(rng, timeout_s)
        return out

    def _read_range(self, rng: OffsetRange, timeout_s: float) -> list[dict[str, Any]]:
        tp = TopicPartition(rng.topic, rng.partition)
        wanted = set(rng.offsets) or set(range(rng.first, rng.last + 1))
        self._consumer.assign([tp])
        self._consumer.seek(tp, rng.first)
        found: list[dict[str, Any]] = []
        end = min(self._consumer.end_offsets([tp])[tp], rng.last + 1)
        polls = max(1, int(timeout_s / 0.5))
        while self._consumer.position(tp) < end and polls:
            polls -= 1
            for rec in self._consumer.poll(timeout_ms=500, max_records=500).get(tp, []):
                if rec.offset in wanted:
                    found.append({"topic": rng.topic, "partition": rng.partition,
                                  "offset": rec.offset, "value": orjson.loads(rec.value)})
        return found


_READERS: dict[tuple[str, str], RecordReader] = {}


def reader_for(settings: Settings) -> RecordReader:
    key = (settings.bootstrap_servers, settings.topic_prefix)
    if key not in _READERS:
        _READERS[key] = RecordReader(settings)
    return _READERS[key]


def archive(settings: Settings, store: ArtifactStore, policy_id: str, step: int,
            provenance: Provenance) -> Provenance:
    """Copy the records `provenance` names into the store; the provenance with the copy named.
    Records retention already took are missing from the copy (its count says how many made
    it); the revision is recorded either way."""
    records = reader_for(settings).read(provenance.rollouts)
    expected = sum(len(r.offsets) or (r.last - r.first + 1) for r in provenance.rollouts)
    if len(records) < expected:
        log.warning("provenance of %s step %d: %d of %d records still retained", policy_id,
                    step, len(records), expected)
    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    key = f"{ARCHIVE_DIR}/{policy_id}/{step}.jsonl"
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".arch.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if store.remote is not None:
        store.remote.put(path, key)
    return provenance.model_copy(update={"archive": store.location(path),
                                         "archive_sha256": hashlib.sha256(body).hexdigest(),
                                         "archived_records": len(records)})


def archived_records(store: ArtifactStore, provenance: Provenance) -> list[dict[str, Any]]:
    """The archived records of a revision, checked against the sha256 its provenance names."""
    if provenance.archive is None:
        raise LookupError("this revision's provenance has no archive")
    key = store.remote.key_of(provenance.archive) if store.remote is not None else None
    path = store.root / key if key is not None else Path(provenance.archive)
    if key is not None and not path.is_file():
        assert store.remote is not None
        store.remote.get(key, path)
    body = path.read_bytes()
    if hashlib.sha256(body).hexdigest() != provenance.archive_sha256:
        raise ValueError(f"provenance archive {provenance.archive} does not match its sha256")
    return [orjson.loads(line) for line in body.splitlines() if line]


def interactions(store: ArtifactStore, provenance: Provenance) -> list[InteractionLogged]:
    """The interaction logs a revision was trained on, from its archive alone."""
    return [RolloutRewarded.model_validate(r["value"]).rollout.interaction
            for r in archived_records(store, provenance)]
