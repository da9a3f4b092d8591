"""The catalog's pure logic: lifecycle state machine, record keys and partitions, provenance,
folding records into policy views, and the retention rule.

No I/O here: the writer (`workers.catalog.writer`), the Redis index (`workers.catalog.index`)
and the rebuild all share these rules, so the index, a rebuilt index and a fold of the topic
cannot disagree about what a record means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import orjson
from kafka.partitioner.default import murmur2

from schemas.catalog import (
    CATALOG_TYPES,
    AliasMoved,
    ArtifactCollected,
    CatalogRecord,
    OffsetRange,
    PolicyRegistered,
    RevisionEvaluated,
    RevisionRecorded,
    RevisionStateChanged,
    RollbackRecorded,
)
from schemas.errors import PoisonEventError


class RevisionState(StrEnum):
    """A revision's lifecycle. Each state has a one-char code for the compact Redis index."""

    EXPORTED = "exported"
    EVALUATED = "evaluated"
    SERVING = "serving"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"

    @property
    def code(self) -> str:
        return _CODES[self]

    @classmethod
    def from_code(cls, code: str) -> RevisionState:
        return _FROM_CODE[code]


_CODES = {
    RevisionState.EXPORTED: "E", RevisionState.EVALUATED: "V", RevisionState.SERVING: "S",
    RevisionState.RETIRED: "T", RevisionState.REJECTED: "J", RevisionState.ROLLED_BACK: "B",
}
_FROM_CODE = {v: k for k, v in _CODES.items()}

TRANSITIONS: dict[RevisionState, frozenset[RevisionState]] = {
    RevisionState.EXPORTED: frozenset({RevisionState.EVALUATED, RevisionState.REJECTED}),
    RevisionState.EVALUATED: frozenset(
        {RevisionState.SERVING, RevisionState.RETIRED, RevisionState.REJECTED}
    ),
    RevisionState.SERVING: frozenset({RevisionState.RETIRED, RevisionState.ROLLED_BACK}),
    # Rollback re-serves a revision that served before (retired) or was rolled back by mistake.
    RevisionState.RETIRED: frozenset({RevisionState.SERVING}),
    RevisionState.ROLLED_BACK: frozenset({RevisionState.SERVING}),
    RevisionState.REJECTED: frozenset(),  # failed its evaluation: never serves
}
"""exported → evaluated → serving → retired, or rejected / rolled back; anything else is refused."""

TERMINAL = frozenset({RevisionState.RETIRED, RevisionState.REJECTED, RevisionState.ROLLED_BACK})


class IllegalTransitionError(ValueError):
    """A lifecycle move the state machine does not allow; nothing was written."""


def check_transition(current: RevisionState, target: RevisionState) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing"
        raise IllegalTransitionError(
            f"illegal transition {current} → {target} (from {current}: {allowed})"
        )


def partition_for(policy_id: str, partitions: int) -> int:
    """Kafka's default partitioner on the policy id: a policy's catalog records share its
    pipeline partition and stay in write order."""
    return (murmur2(policy_id.encode()) & 0x7FFFFFFF) % partitions


def decode_record(raw: bytes | None) -> CatalogRecord:
    """A catalog record of any kind; unknown kinds and schema violations are poison."""
    if raw is None:
        raise PoisonEventError("tombstone")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonEventError(f"malformed JSON: {exc}") from exc
    model = CATALOG_TYPES.get(str(data.get("kind"))) if isinstance(data, dict) else None
    if model is None:
        raise PoisonEventError(f"not a catalog record: {str(data)[:80]}")
    return model.model_validate(data)


def offset_ranges(positions: Iterable[tuple[str, int, int]]) -> tuple[OffsetRange, ...]:
    """Group (topic, partition, offset) positions into one exact range per topic partition."""
    grouped: dict[tuple[str, int], list[int]] = {}
    for topic, partition, offset in positions:
        grouped.setdefault((topic, partition), []).append(offset)
    return tuple(
        OffsetRange(topic=t, partition=p, first=min(o), last=max(o), offsets=tuple(sorted(set(o))))
        for (t, p), o in sorted(grouped.items())
    )


# ------------------------------------------------------------------------------ fold


@dataclass
class RevisionView:
    """What the catalog knows about one revision."""

    record: RevisionRecorded | None = None
    state: RevisionState = RevisionState.EXPORTED
    state_reason: str = ""
    evaluations: list[RevisionEvaluated] = field(default_factory=list)
    collected: bool = False


@dataclass
class PolicyView:
    """One policy folded from its records."""

    policy_id: str
    identity: PolicyRegistered | None = None
    revisions: dict[int, RevisionView] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=lambda: {"serving": 0, "candidate": 0})
    last_rollback: RollbackRecorded | None = None

    @property
    def head(self) -> int:
        return max((n for n, r in self.revisions.items() if r.record), default=0)

    def rev(self, n: int) -> RevisionView:
        return self.revisions.setdefault(n, RevisionView())


def apply(view: PolicyView, record: CatalogRecord) -> None:
    """Fold one record into its policy's view (records are applied in offset order)."""
    if isinstance(record, PolicyRegistered):
        view.identity = record
    elif isinstance(record, RevisionRecorded):
        view.rev(record.revision).record = record
    elif isinstance(record, RevisionEvaluated):
        evals = view.rev(record.revision).evaluations
        if all(e.event_id != record.event_id for e in evals):
            evals.append(record)
    elif isinstance(record, RevisionStateChanged):
        rv = view.rev(record.revision)
        rv.state, rv.state_reason = RevisionState(record.state), record.reason
    elif isinstance(record, AliasMoved):
        view.aliases[record.alias] = record.revision
    elif isinstance(record, RollbackRecorded):
        view.last_rollback = record
    elif isinstance(record, ArtifactCollected):
        view.rev(record.revision).collected = True


def fold(records: Iterable[CatalogRecord]) -> dict[str, PolicyView]:
    """Every policy's view from a sequence of records (e.g. a compacted topic, in order)."""
    views: dict[str, PolicyView] = {}
    for record in records:
        view = views.setdefault(record.policy_id, PolicyView(record.policy_id))
        apply(view, record)
    return views


# ------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class RetentionPolicy:
    """Which revisions keep their files.

    Kept: every revision an alias (`serving`, `candidate`) points at and its parent; the newest
    `keep_last` revisions of each policy; revisions still moving through the pipeline (exported
    or evaluated, newer than serving). Everything else (retired, rejected, rolled back, or
    superseded before serving) may have its artifact collected, unless another kept revision
    shares the same content hash.
    """

    keep_last: int = 3

    def describe(self) -> str:
        return (f"keep aliases (serving, candidate) and their parents, the newest "
                f"{self.keep_last} revisions, and in-flight revisions newer than serving")


def retained(revisions: dict[int, tuple[RevisionState, int]], aliases: Sequence[int],
             policy: RetentionPolicy) -> set[int]:
    """Revision numbers to keep; `revisions` maps n → (state, parent revision)."""
    keep: set[int] = set()
    for n in aliases:
        if n in revisions:
            keep.add(n)
            keep.add(revisions[n][1])
    keep.update(sorted(revisions)[-policy.keep_last:] if policy.keep_last > 0 else [])
    serving = aliases[0] if aliases else 0
    keep.update(n for n, (state, _) in revisions.items()
                if n > serving and state not in TERMINAL)
    keep.discard(0)
    return keep
