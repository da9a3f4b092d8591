"""The catalog index's value types (revision pointers, resolutions, lookups, policy entries)
and serve names, apart from the Redis code so that readers can name them without a client."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.catalog.lifecycle import RevisionState


def serve_name(policy_id: str, revision: int) -> str:
    """Immutable serve name: a new revision is a new name, so no cache can serve stale weights."""
    return f"{policy_id}@{revision}"


@dataclass(frozen=True)
class RevisionPointer:
    """Where a revision's adapter lives; revision 0 means the bare base model."""

    revision: int
    sha256: str | None = None
    path: str | None = None
    score: float | None = None

    @property
    def is_base(self) -> bool:
        return self.revision == 0


BASE = RevisionPointer(revision=0)


@dataclass(frozen=True)
class Resolution:
    """Where a policy is served from: revision 0 means the bare base model."""

    policy_id: str
    revision: int
    sha256: str | None
    path: Path | None

    @property
    def serve_name(self) -> str:
        return serve_name(self.policy_id, self.revision)


@dataclass(frozen=True)
class Lookup:
    """What serving a request needs about a policy, from one round trip (`CatalogIndex.lookup`):
    its namespace (who may use it) and the revision asked for, serving unless pinned."""

    policy_id: str
    namespace: str
    revision: int
    sha256: str | None
    state: RevisionState | None
    collected: bool = False

    @property
    def recorded(self) -> bool:
        """The revision exists (the base, revision 0, always does)."""
        return self.revision == 0 or self.sha256 is not None

    @property
    def serve_name(self) -> str | None:
        """The engines' name for the revision; None = the bare base model."""
        return serve_name(self.policy_id, self.revision) if self.revision else None


@dataclass(frozen=True)
class RevisionEntry:
    revision: int
    sha256: str
    size_bytes: int
    step: int
    parent: int
    offset: int
    state: RevisionState
    eval_offsets: tuple[int, ...] = ()
    collected: bool = False


@dataclass
class PolicyEntry:
    """A policy as the index holds it."""

    policy_id: str
    namespace: str
    base: dict[str, Any]
    lora: dict[str, Any]
    partition: int
    offset: int
    serving: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    """The policy's training config (`schemas.catalog.TrainingConfig`); empty: defaults."""
    candidate: int = 0
    rollback_offset: int | None = None
    revisions: dict[int, RevisionEntry] = field(default_factory=dict)

    @property
    def head(self) -> int:
        return max(self.revisions, default=0)
