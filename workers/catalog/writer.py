"""The catalog writer: every change is a record on the compacted `catalog` topic first, then an
index update in Redis.

Each operation reads the policy's index entry, checks the lifecycle rules, publishes its records
(acks=all, to the policy's partition), and applies them to the index with the offsets Kafka
assigned. A short per-policy Redis lock serialises writers of one policy (the pipeline's stages
and an operator's `rollback`), so a check and the write it guards cannot interleave with another.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from kafka import KafkaProducer

from infra.admin import client_config
from infra.settings import Settings
from schemas.catalog import (
    Alias,
    AliasMoved,
    CatalogRecord,
    LoraConfig,
    PolicyRegistered,
    Provenance,
    RevisionEvaluated,
    RevisionRecorded,
    RevisionStateChanged,
    RollbackRecorded,
    TrainingConfig,
)
from schemas.codec import encode_event
from schemas.events import Event, PolicyRolledBack
from schemas.ids import derive_id
from workers.catalog.entries import PolicyEntry
from workers.catalog.index import CatalogIndex
from workers.catalog.lifecycle import (
    IllegalTransitionError,
    RevisionState,
    check_transition,
    partition_for,
)

LOCK_TTL_MS = 10_000
LOCK_WAIT_S = 15.0
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CatalogError(ValueError):
    """A catalog request that cannot be honoured (unknown policy, revision, bad identity)."""


class Catalog:
    """Writes catalog records and keeps the Redis index and working set in step with them."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 index: CatalogIndex | None = None) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.index = index or CatalogIndex(settings, self.r)
        self._producer: KafkaProducer | None = None
        self._partitions: int | None = None
        self._unlock = self.r.register_script(_UNLOCK)

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**client_config(self.settings), acks="all",
                                           linger_ms=0, retries=5)
        return self._producer

    def partition(self, policy_id: str) -> int:
        if self._partitions is None:
            parts = self.producer.partitions_for(self.settings.topic("catalog"))
            if not parts:
                raise CatalogError(f"topic {self.settings.topic('catalog')} does not exist")
            self._partitions = len(parts)
        return partition_for(policy_id, self._partitions)

    def publish(self, records: Sequence[CatalogRecord]) -> list[int]:
        """Durably append records (in order), then index them; returns their offsets."""
        topic = self.settings.topic("catalog")
        futures = [self.producer.send(topic, key=r.key().encode(), value=encode_event(r),
                                      partition=self.partition(r.policy_id)) for r in records]
        metas = [f.get(timeout=30) for f in futures]
        pipe = self.r.pipeline(transaction=False)
        for record, meta in zip(records, metas, strict=True):
            self.index.apply(pipe, record.model_dump(mode="json"), meta.partition, meta.offset)
        pipe.execute()
        return [m.offset for m in metas]

    @contextlib.contextmanager
    def lock(self, policy_id: str) -> Iterator[None]:
        key, token = self.index.keys.catalog_lock(policy_id), uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self.r.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise TimeoutError(f"catalog lock for {policy_id!r} held too long")
            time.sleep(0.005)  # another writer of this policy is mid-operation
        try:
            yield
        finally:
            self._unlock(keys=[key], args=[token])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None

    def entry(self, policy_id: str) -> PolicyEntry:
        entry = self.index.get(policy_id)
        if entry is None:
            raise CatalogError(f"unknown policy {policy_id!r}")
        return entry

    # -- identity -------------------------------------------------------------------------------
    def register(self, policy_id: str, *, base_model: str, base_model_hash: str,
                 lora: LoraConfig, namespace: str = "default") -> bool:
        """Record a policy's identity once; True if it was new. Identity is immutable."""
        with self.lock(policy_id):
            entry = self.index.get(policy_id)
            if entry is not None:
                _require_base(policy_id, entry, base_model_hash)
                return False
            self.publish([PolicyRegistered(
                event_id=derive_id("catalog-register", policy_id), policy_id=policy_id,
                namespace=namespace, base_model=base_model, base_model_hash=base_model_hash,
                lora=lora)])
            return True

    def configure(self, policy_id: str, *, base_model: str, base_model_hash: str,
                  lora: LoraConfig, training: TrainingConfig,
                  namespace: str | None = None) -> PolicyRegistered | None:
        """Record a policy's configuration: a new `PolicyRegistered` under the policy's key (a
        change is a new record; compaction keeps the newest, each revision's provenance keeps
        the one it was trained with). None when nothing changed. The adapter's shape (rank,
        alpha, targets) is fixed once the policy has a revision: a revision only loads with the
        shape it was made with."""
        with self.lock(policy_id):
            entry = self.index.get(policy_id)
            if entry is not None:
                _require_base(policy_id, entry, base_model_hash)
                current = LoraConfig(**entry.lora)
                if entry.revisions and current != lora:
                    raise CatalogError(
                        f"policy {policy_id!r} has revisions of rank {current.rank}, alpha "
                        f"{current.alpha}, targets {','.join(current.target_modules)}: its "
                        "adapter's shape is fixed (create a new policy for another shape)")
                namespace = namespace or entry.namespace
                if (current == lora and TrainingConfig(**entry.training) == training
                        and namespace == entry.namespace):
                    return None
            record = PolicyRegistered(
                event_id=derive_id("catalog-configure", policy_id,
                                   entry.offset if entry is not None else -1,
                                   lora.model_dump_json(), training.model_dump_json()),
                policy_id=policy_id, namespace=namespace or "default", base_model=base_model,
                base_model_hash=base_model_hash, lora=lora, training=training)
            self.publish([record])
            return record

    # -- revisions ------------------------------------------------------------------------------
    def record_revision(self, policy_id: str, *, step: int, sha256: str, size_bytes: int,
                        provenance: Provenance) -> RevisionRecorded:
        """Number and record a revision; the same trainer step always gets the same number, and
        numbers have no gaps (the next is head + 1). Moves `candidate` to it."""
        with self.lock(policy_id):
            entry = self.entry(policy_id)
            for rev in entry.revisions.values():
                if rev.step == step:
                    if rev.sha256 != sha256:
                        raise CatalogError(f"{policy_id} step {step} is r{rev.revision} with "
                                           f"{rev.sha256}, not {sha256}")
                    return self._revision_record(policy_id, rev.revision, step, sha256,
                                                 size_bytes, provenance)
            n = entry.head + 1
            record = self._revision_record(policy_id, n, step, sha256, size_bytes,
                                           provenance.model_copy(update={"parent_revision": n - 1}))
            self.publish([record, self._alias(entry, "candidate", n, f"r{n} exported")])
            return record

    @staticmethod
    def _revision_record(policy_id: str, n: int, step: int, sha256: str, size_bytes: int,
                         provenance: Provenance) -> RevisionRecorded:
        return RevisionRecorded(
            event_id=derive_id("catalog-revision", policy_id, n), policy_id=policy_id,
            revision=n, sha256=sha256, size_bytes=size_bytes, step=step, provenance=provenance)

    def record_evaluation(self, evaluation: RevisionEvaluated) -> None:
        """Keep an evaluation; the first one moves the revision from exported to evaluated.

        A redelivered evaluation is written again under the same key (its id), so compaction
        and readers (which dedupe by id) see it once."""
        pid, n = evaluation.policy_id, evaluation.revision
        with self.lock(pid):
            entry = self.entry(pid)
            if n not in entry.revisions:
                raise CatalogError(f"{pid} has no revision {n}")
            rev = entry.revisions[n]
            records: list[CatalogRecord] = [evaluation]
            if rev.state == RevisionState.EXPORTED:
                records.append(self._state(pid, n, rev.state, RevisionState.EVALUATED,
                                           evaluation.reason))
            self.publish(records)

    def transition(self, policy_id: str, revision: int, target: RevisionState,
                   reason: str = "") -> None:
        """Move one revision to `target` if the state machine allows it (else raise)."""
        with self.lock(policy_id):
            rev = self._rev(self.entry(policy_id), revision)
            if rev.state != target:
                self.publish([self._state(policy_id, revision, rev.state, target, reason)])

    @staticmethod
    def _rev(entry: PolicyEntry, n: int) -> Any:
        if n not in entry.revisions:
            raise CatalogError(f"{entry.policy_id} has no revision {n}")
        return entry.revisions[n]

    @staticmethod
    def _state(pid: str, n: int, current: RevisionState, target: RevisionState,
               reason: str) -> RevisionStateChanged:
        check_transition(current, target)
        return RevisionStateChanged(
            event_id=derive_id("catalog-state", pid, n, target, time.time_ns()), policy_id=pid,
            revision=n, state=target.value, previous=current.value, reason=reason)

    @staticmethod
    def _alias(entry: PolicyEntry, alias: Alias, n: int, reason: str) -> AliasMoved:
        previous = entry.serving if alias == "serving" else entry.candidate
        return AliasMoved(event_id=uuid.uuid4().hex, policy_id=entry.policy_id, alias=alias,
                          revision=n, previous=previous, reason=reason)

    # -- serving ----------------------------------------------------------------------------------
    def promote(self, policy_id: str, revision: int, reason: str) -> int:
        """Serve `revision`: the old serving revision retires, the aliases (and with the serving
        alias the hot set) move. Returns the old one."""
        with self.lock(policy_id):
            entry = self.entry(policy_id)
            rev = self._rev(entry, revision)
            if rev.state != RevisionState.EVALUATED:  # retired/rolled back: only `rollback`
                raise IllegalTransitionError(
                    f"{policy_id} r{revision} is {rev.state}: only an evaluated revision is "
                    "promoted (use rollback to serve an earlier one)")
            records: list[CatalogRecord] = []
            old = entry.serving
            if old and old != revision:
                records.append(self._state(policy_id, old, entry.revisions[old].state,
                                           RevisionState.RETIRED, f"replaced by r{revision}"))
            records.append(self._state(policy_id, revision, rev.state, RevisionState.SERVING,
                                       reason))
            records.append(self._alias(entry, "serving", revision, reason))
            if entry.candidate == revision:
                records.append(self._alias(entry, "candidate", 0, f"r{revision} promoted"))
            self.publish(records)
            return old

    def rollback(self, policy_id: str, to: int | None = None,
                 reason: str = "operator rollback") -> PolicyRolledBack:
        """Serve an earlier revision (default: the newest that served before), in the catalog,
        the index and so the hot set, and announce it on `promotions`."""
        with self.lock(policy_id):
            entry = self.entry(policy_id)
            cur = entry.serving
            if cur == 0:
                raise CatalogError(f"{policy_id} serves the base model: nothing to roll back")
            target = default_rollback_target(entry) if to is None else to
            if target == cur:
                raise CatalogError(f"{policy_id} already serves r{cur}")
            records = self._rollback_records(entry, cur, target, reason)
            self.publish(records)
        event = PolicyRolledBack(**records[-1].model_dump(exclude={"kind"}))
        self.announce(event)
        return event

    def announce(self, event: Event) -> None:
        """Publish a control event on `promotions`, keyed by its policy (so one policy's
        announcements stay in order), and wait until the broker has it."""
        fut = self.producer.send(self.settings.topic("promotions"),
                                 key=event.policy_id.encode(), value=encode_event(event))
        fut.get(timeout=30)

    def _rollback_records(self, entry: PolicyEntry, cur: int, target: int,
                          reason: str) -> list[CatalogRecord]:
        pid = entry.policy_id
        records: list[CatalogRecord] = [self._state(
            pid, cur, entry.revisions[cur].state, RevisionState.ROLLED_BACK, reason)]
        if target:
            rev = self._rev(entry, target)
            if rev.collected:
                raise CatalogError(f"{pid} r{target}'s artifact was collected by retention")
            records.append(self._state(pid, target, rev.state, RevisionState.SERVING, reason))
        records.append(self._alias(entry, "serving", target, f"rollback: {reason}"))
        records.append(RollbackRecorded(
            event_id=derive_id("rollback", pid, cur, target, time.time_ns()), policy_id=pid,
            from_revision=cur, to_revision=target, reason=reason))
        return records


def default_rollback_target(entry: PolicyEntry) -> int:
    """The newest revision older than serving that served before (retired), else the base."""
    older = [r for n, r in entry.revisions.items() if n < entry.serving]
    served = [r.revision for r in older
              if r.state == RevisionState.RETIRED and not r.collected]
    return max(served, default=0)


def _require_base(policy_id: str, entry: PolicyEntry, base_model_hash: str) -> None:
    """A policy's base is part of its identity: nothing re-registers it on another base."""
    if entry.base.get("hash") != base_model_hash:
        raise CatalogError(f"policy {policy_id!r} is registered on base "
                           f"{entry.base.get('hash')}, not {base_model_hash}")
