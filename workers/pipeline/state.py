"""Per-policy pipeline state in Redis: revisions, the serving alias, held-out prompts, dedup marks.

Redis is the fast, shared copy that stages in different processes read: the rollout stage needs
the training head, the evaluate stage the serving revision and held-out set, the promote stage
the hot working set. Revision numbers come from the catalog (`workers/catalog/writer.py`),
which is also what this working set can be rebuilt from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis

from infra.settings import Settings
from schemas.events import InteractionLogged

SEEN_TTL_S = 7 * 24 * 3600
_MARK_MANY = """
for _, key in ipairs(KEYS) do redis.call('SET', key, 1, 'EX', ARGV[1]) end
return #KEYS
"""
"""One command for a batch's seen-marks: MSET takes no TTL, and a pipeline of SETs costs a
client-side encode and parse per key, which at ingest rates is the stage's main cost."""

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


def serve_name(policy_id: str, revision: int) -> str:
    """Immutable serve name: a new revision is a new name, so no cache can serve stale weights."""
    return f"{policy_id}@{revision}"


class PolicyState:
    """Typed access to the pipeline's Redis keys under `settings.redis_prefix`."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self._mark_many = self.r.register_script(_MARK_MANY)

    def _k(self, *parts: str | int) -> str:
        return self.settings.key(*parts)

    # -- idempotence ---------------------------------------------------------------------
    def seen(self, stage: str, event_id: str) -> bool:
        return bool(self.r.exists(self._k("seen", stage, event_id)))

    def mark_seen(self, stage: str, event_id: str) -> None:
        self.r.set(self._k("seen", stage, event_id), 1, ex=SEEN_TTL_S)

    def seen_many(self, stage: str, event_ids: list[str]) -> list[bool]:
        """`seen` for a whole batch in one command (the stream's hot path)."""
        if not event_ids:
            return []
        return [v is not None for v in self.r.mget([self._k("seen", stage, e) for e in event_ids])]

    def mark_seen_many(self, stage: str, event_ids: list[str]) -> None:
        """`mark_seen` for a whole batch in one command."""
        if event_ids:
            self._mark_many(keys=[self._k("seen", stage, e) for e in event_ids],
                            args=[SEEN_TTL_S])

    # -- held-out prompts ----------------------------------------------------------------
    def add_heldout(self, interaction: InteractionLogged) -> None:
        self.r.hset(
            self._k("heldout", interaction.policy_id),
            interaction.event_id,
            interaction.model_dump_json(),
        )

    def add_heldout_many(self, interactions: list[InteractionLogged]) -> None:
        """`add_heldout` for a batch in one round trip: one HSET per policy."""
        by_policy: dict[str, dict[str, str]] = {}
        for i in interactions:
            by_policy.setdefault(i.policy_id, {})[i.event_id] = i.model_dump_json()
        pipe = self.r.pipeline(transaction=False)
        for policy_id, fields in by_policy.items():
            pipe.hset(self._k("heldout", policy_id), mapping=fields)  # type: ignore[arg-type]
        pipe.execute()

    def heldout(self, policy_id: str) -> list[InteractionLogged]:
        raw = self.r.hgetall(self._k("heldout", policy_id))
        items = [InteractionLogged.model_validate_json(v) for _, v in sorted(raw.items())]
        return items

    # -- revisions -------------------------------------------------------------------------
    def record_revision(self, policy_id: str, rev: RevisionPointer) -> None:
        """Store a revision's location and move the training head forward (never back)."""
        self.r.hset(
            self._k("revision", policy_id, rev.revision),
            mapping={"sha256": rev.sha256 or "", "path": rev.path or ""},
        )
        head = self.r.hget(self._k("policy", policy_id), "head")
        if head is None or int(head) < rev.revision:
            self.r.hset(self._k("policy", policy_id), "head", rev.revision)
        self.r.sadd(self._k("policies"), policy_id)

    def revision(self, policy_id: str, revision: int) -> RevisionPointer:
        if revision == 0:
            return BASE
        raw = cast("dict[bytes, bytes]", self.r.hgetall(self._k("revision", policy_id, revision)))
        if not raw:
            raise KeyError(f"policy {policy_id!r} has no revision {revision}")
        score = raw.get(b"score")
        return RevisionPointer(
            revision=revision,
            sha256=raw[b"sha256"].decode() or None,
            path=raw[b"path"].decode() or None,
            score=float(score) if score is not None else None,
        )

    def head(self, policy_id: str) -> RevisionPointer:
        """The newest exported revision: what the rollout stage samples from."""
        head = self.r.hget(self._k("policy", policy_id), "head")
        return self.revision(policy_id, int(head)) if head else BASE

    # -- evaluation scores and the serving alias -------------------------------------------
    def cached_score(self, policy_id: str, key: str) -> float | None:
        """A held-out score, keyed by revision and the held-out set it was measured on."""
        raw = self.r.hget(self._k("scores", policy_id), key)
        return float(raw) if raw is not None else None

    def cache_score(self, policy_id: str, key: str, score: float) -> None:
        self.r.hset(self._k("scores", policy_id), key, score)

    # -- trainer checkpoints ---------------------------------------------------------------
    def set_checkpoint(self, policy_id: str, step: int) -> None:
        self.r.hset(self._k("policy", policy_id), "checkpoint_step", step)

    def checkpoint_step(self, policy_id: str) -> int | None:
        raw = self.r.hget(self._k("policy", policy_id), "checkpoint_step")
        return int(raw) if raw is not None else None

    def serving(self, policy_id: str) -> RevisionPointer:
        raw = self.r.hget(self._k("policy", policy_id), "serving")
        return self.revision(policy_id, int(raw)) if raw else BASE

    def set_serving(self, policy_id: str, revision: int) -> None:
        """Move the serving alias and the hot working set in one transaction."""
        name = serve_name(policy_id, revision)
        old = self.r.hget(self._k("policy", policy_id), "serving")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("policy", policy_id), "serving", revision)
        if old is not None and int(old) > 0:
            pipe.zrem(self._k("hot"), serve_name(policy_id, int(old)))
        if revision > 0:
            pipe.zadd(self._k("hot"), {name: time.time()})
        pipe.hset(self._k("serving"), policy_id, name if revision > 0 else "")
        pipe.execute()

    def hot_set(self) -> list[str]:
        return [m.decode() for m in cast("list[bytes]", self.r.zrange(self._k("hot"), 0, -1))]

    # -- flow control ----------------------------------------------------------------------
    def note_sampled(self, policy_id: str) -> int:
        return int(self.r.hincrby(self._k("policy", policy_id), "sampled", 1))

    def note_trained(self, policy_id: str) -> int:
        return int(self.r.hincrby(self._k("policy", policy_id), "trained", 1))

    def in_flight(self, policy_id: str) -> int:
        """Groups sampled but not yet consumed by the trainer (bounds off-policy staleness)."""
        return self.in_flight_many([policy_id])[policy_id]

    def in_flight_many(self, policy_ids: Sequence[str]) -> dict[str, int]:
        """`in_flight` of several policies in one round trip: the rollout runner asks for all
        the policies of a unit it is forming at once."""
        pipe = self.r.pipeline(transaction=False)
        for policy_id in policy_ids:
            pipe.hmget(self._k("policy", policy_id), "sampled", "trained")
        return {p: int(sampled or 0) - int(trained or 0)
                for p, (sampled, trained) in zip(policy_ids, pipe.execute(), strict=True)}

    def policies(self) -> list[str]:
        return sorted(m.decode() for m in cast("set[bytes]", self.r.smembers(self._k("policies"))))
