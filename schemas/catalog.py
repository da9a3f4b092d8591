"""Catalog records, v1: the durable history of every policy, carried by the compacted `catalog`
topic.

Compaction keeps only the newest record per key, so each record's key names exactly the fact it
states, and no fact is ever overwritten by a different one:

| record | key | kept |
|---|---|---|
| `PolicyRegistered` | `<policy>` | identity (namespace, base model and hash, LoRA config) |
| `RevisionRecorded` | `<policy>/rev/<n>` | one immutable revision: artifact and provenance |
| `RevisionEvaluated` | `<policy>/rev/<n>/eval/<id>` | every evaluation, each under its own key |
| `RevisionStateChanged` | `<policy>/rev/<n>/state` | the revision's current lifecycle state |
| `AliasMoved` | `<policy>/alias/<alias>` | where `serving` / `candidate` point now |
| `PolicyRolledBack` | `<policy>/rollback` | the latest rollback (all of them: `promotions`) |
| `ArtifactCollected` | `<policy>/rev/<n>/gc` | the revision's files were collected by retention |

Every record of one policy goes to the same partition (see
`workers.catalog.lifecycle.partition_for`), so a policy's records keep their write order and a
reader can fold them in offset order.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.events import Event, Objective, PolicyRolledBack, Sha256

Namespace = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")]
"""A tenant: same alphabet as policy ids (no path characters), at most 32 chars."""

Alias = Literal["serving", "candidate"]
StateName = Literal["exported", "evaluated", "serving", "retired", "rejected", "rolled_back"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class LoraConfig(_Part):
    """The adapter's shape; an adapter is only loadable with the exact config it was made with."""

    rank: int = Field(ge=1)
    alpha: float
    target_modules: tuple[str, ...] = ()


class TrainingConfig(_Part):
    """How a policy trains, beyond its adapter's shape; None takes the pipeline's setting
    (`LORASTREAM_*`), so a policy configures only what differs."""

    objective: Objective = "grpo"
    reward: str | None = Field(default=None, min_length=1, max_length=64)
    """The reward that scores the policy's rollouts and held-out prompts; None: each
    interaction's `task` names it."""
    learning_rate: float | None = Field(default=None, gt=0.0)
    kl_beta: float | None = Field(default=None, ge=0.0)
    clip_eps: float | None = Field(default=None, gt=0.0)
    dpo_beta: float | None = Field(default=None, gt=0.0)
    dpo_sft_weight: float | None = Field(default=None, ge=0.0)


class OffsetRange(_Part):
    """Consecutive offsets `first..last` (inclusive) of one topic partition; `count` of them
    carried this policy's events (the rest belong to other policies on the partition)."""

    topic: str = Field(min_length=1, max_length=249)
    partition: int = Field(ge=0)
    first: int = Field(ge=0)
    last: int = Field(ge=0)
    offsets: tuple[int, ...] = ()
    """Exactly which offsets in `first..last` trained this revision."""


class RewardFnRef(_Part):
    name: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=0)


class Provenance(_Part):
    """Where a revision came from: enough to name every interaction that shaped it."""

    parent_revision: int = Field(ge=0)
    base_model_hash: Sha256
    trainer_version: str = Field(min_length=1, max_length=128)
    hyperparameters: dict[str, float | int | str | bool] = Field(default_factory=dict)
    """The pipeline's settings, overlaid with the policy's own configuration's values."""
    configs: tuple[str, ...] = ()
    """Ids of the policy configurations its steps trained with (`config_id` of each step)."""
    reward_fns: tuple[RewardFnRef, ...] = ()
    rollouts: tuple[OffsetRange, ...] = ()
    """The `rewards` messages the trainer consumed (each embeds its rollout and interaction)."""
    rollout_ids: tuple[str, ...] = ()
    first_step: int = Field(ge=0)
    last_step: int = Field(ge=0)
    tokens: int = Field(ge=0)
    started_ts: float
    finished_ts: float
    archive: str | None = None
    """Where a copy of the `rollouts` records is kept beyond the topics' retention (a file of
    the artifact store, `workers/catalog/archive.py`)."""
    archive_sha256: Sha256 | None = None
    archived_records: int = Field(default=0, ge=0)


class CatalogRecord(Event):
    """Base of every catalog record; `key()` is its compaction key."""

    def key(self) -> str:
        raise NotImplementedError


class PolicyRegistered(CatalogRecord):
    """A policy's identity: who it is, which base it adapts, the adapter's shape, and how it
    trains. A configuration change is a new record under the same key (`lorastream policy
    create`); each revision's provenance keeps the configuration it was trained with."""

    kind: Literal["policy_registered"] = "policy_registered"
    namespace: Namespace = "default"
    base_model: str = Field(min_length=1, max_length=512)
    base_model_hash: Sha256
    lora: LoraConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def key(self) -> str:
        return self.policy_id


class RevisionRecorded(CatalogRecord):
    """An immutable revision: numbered without gaps per policy, content-addressed."""

    kind: Literal["revision_recorded"] = "revision_recorded"
    revision: int = Field(ge=1)
    sha256: Sha256
    size_bytes: int = Field(ge=0)
    step: int = Field(ge=0)
    provenance: Provenance

    def key(self) -> str:
        return f"{self.policy_id}/rev/{self.revision}"


class RevisionEvaluated(CatalogRecord):
    """One evaluation of a revision; every evaluation is kept (its key carries its id)."""

    kind: Literal["revision_evaluated"] = "revision_evaluated"
    revision: int = Field(ge=1)
    evaluator: str = Field(default="heldout", min_length=1, max_length=64)
    score: float
    baseline_revision: int = Field(ge=0)
    baseline_score: float
    prompts: int = Field(ge=0)
    passed: bool
    reason: str = ""
    selection_score: float | None = None
    selection_baseline_score: float | None = None
    selection_prompts: int = Field(default=0, ge=0)

    def key(self) -> str:
        return f"{self.policy_id}/rev/{self.revision}/eval/{self.event_id[:16]}"


class RevisionStateChanged(CatalogRecord):
    """A lifecycle transition, checked against `workers.catalog.lifecycle.TRANSITIONS` before
    writing."""

    kind: Literal["revision_state_changed"] = "revision_state_changed"
    revision: int = Field(ge=1)
    state: StateName
    previous: StateName
    reason: str = ""

    def key(self) -> str:
        return f"{self.policy_id}/rev/{self.revision}/state"


class AliasMoved(CatalogRecord):
    """An alias now points at `revision` (0: the bare base model for `serving`, none for
    `candidate`)."""

    kind: Literal["alias_moved"] = "alias_moved"
    alias: Alias
    revision: int = Field(ge=0)
    previous: int = Field(ge=0)
    reason: str = ""

    def key(self) -> str:
        return f"{self.policy_id}/alias/{self.alias}"


class RollbackRecorded(PolicyRolledBack, CatalogRecord):
    """The `PolicyRolledBack` event as a catalog record (same fields, same kind)."""

    def key(self) -> str:
        return f"{self.policy_id}/rollback"


class ArtifactCollected(CatalogRecord):
    """Retention deleted this revision's files; the record of the revision stays."""

    kind: Literal["artifact_collected"] = "artifact_collected"
    revision: int = Field(ge=1)
    sha256: Sha256
    policy: str = Field(default="", max_length=256)
    """The retention policy that collected it, in words."""

    def key(self) -> str:
        return f"{self.policy_id}/rev/{self.revision}/gc"


CATALOG_TYPES: dict[str, type[CatalogRecord]] = {
    "policy_registered": PolicyRegistered,
    "revision_recorded": RevisionRecorded,
    "revision_evaluated": RevisionEvaluated,
    "revision_state_changed": RevisionStateChanged,
    "alias_moved": AliasMoved,
    "policy_rolled_back": RollbackRecorded,
    "artifact_collected": ArtifactCollected,
}
