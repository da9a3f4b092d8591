"""The pipeline's own Redis state: dedup marks, held-out prompts, scores, in-flight counters.

Redis is the fast, shared copy that stages in different processes read. Revision pointers and
the serving alias are not here: the catalog index (`workers/catalog/index.py`) holds them, and
everything below can be rebuilt from topics (`workers/pipeline/replay.py`) or recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import orjson
import redis

from infra.settings import Settings
from schemas.events import InteractionLogged
from workers.keys import RedisKeys

SEEN_TTL_S = 7 * 24 * 3600
_MARK_MANY = """
for _, key in ipairs(KEYS) do redis.call('SET', key, 1, 'EX', ARGV[1]) end
return #KEYS
"""
"""One command for a batch's seen-marks: MSET takes no TTL, and a pipeline of SETs costs a
client-side encode and parse per key, which at ingest rates is the stage's main cost."""
_HSET_MANY = """
local at = 1
for _, key in ipairs(KEYS) do
  local first, last = at + 1, at + 2 * tonumber(ARGV[at])
  while first <= last do  -- in chunks: unpack's results are bounded by Lua's C stack
    local stop = math.min(first + 399, last)
    redis.call('HSET', key, unpack(ARGV, first, stop))
    first = stop + 1
  end
  at = last + 1
end
return #KEYS
"""
"""Several hashes' fields in one command (ARGV: per key a field count, then field, value...):
for the same reason as `_MARK_MANY`; a batch of held-out prompts spans many policies."""
_HGET_MANY = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, ARGV[1]) end
return out
"""
"""One field of many hashes in one command (a missing one is nil): HMGET reads one hash."""


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()


MIN_SPLIT = 4
"""Fewer held-out prompts than this are not split: both sets are the whole held-out set."""


def split_heldout(heldout: Sequence[InteractionLogged]
                  ) -> tuple[list[InteractionLogged], list[InteractionLogged]]:
    """(selection set, test set) of a policy's held-out prompts.

    The promotion gate compares revisions on the selection set only; the score reported (the
    demo's "reward after", `AdapterEvaluated.score`) is on the test set, which nothing is
    selected on, so it does not flatter the revision that won the selection. A prompt's set is
    a hash bit of its event id: it stays in its set as more prompts arrive. With fewer than
    `MIN_SPLIT` prompts, or when a side would be empty, both are the whole set (the event then
    has no separate selection score)."""
    heldout = list(heldout)
    selection = [h for h in heldout if hashlib.sha256(h.event_id.encode()).digest()[0] & 1]
    test = [h for h in heldout if not hashlib.sha256(h.event_id.encode()).digest()[0] & 1]
    if len(heldout) < MIN_SPLIT or not selection or not test:
        return heldout, heldout
    return selection, test


def score_key(revision: int, heldout: Sequence[InteractionLogged]) -> str:
    """Where a revision's held-out score is cached: scores are comparable only on one set."""
    fingerprint = hashlib.sha256("".join(h.event_id for h in heldout).encode()).hexdigest()[:12]
    return f"{revision}:{fingerprint}"


class PolicyState:
    """Typed access to the pipeline's keys (`workers/keys.py`) under `settings.redis_prefix`."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.keys = RedisKeys(settings)
        self._mark_many = self.r.register_script(_MARK_MANY)
        self._hset_many = self.r.register_script(_HSET_MANY)
        self._hget_many = self.r.register_script(_HGET_MANY)

    # -- idempotence ---------------------------------------------------------------------
    def seen(self, stage: str, event_id: str) -> bool:
        return bool(self.r.exists(self.keys.seen(stage, event_id)))

    def mark_seen(self, stage: str, event_id: str) -> None:
        self.r.set(self.keys.seen(stage, event_id), 1, ex=SEEN_TTL_S)

    def seen_many(self, stage: str, event_ids: list[str]) -> list[bool]:
        """`seen` for a whole batch in one command (the stream's hot path)."""
        if not event_ids:
            return []
        return [v is not None for v in self.r.mget(self.keys.seen_many(stage, event_ids))]

    def mark_seen_many(self, stage: str, event_ids: list[str]) -> None:
        """`mark_seen` for a whole batch in one command."""
        if event_ids:
            self._mark_many(keys=self.keys.seen_many(stage, event_ids), args=[SEEN_TTL_S])

    # -- held-out prompts ----------------------------------------------------------------
    def add_heldout(self, interaction: InteractionLogged) -> None:
        self.add_heldout_many([interaction])

    def add_heldout_many(self, interactions: Sequence[InteractionLogged],
                         records: Sequence[bytes | None] | None = None) -> None:
        """Store held-out prompts in one round trip: one HSET per policy, keyed by event id.
        `records`, when given, are the events' bytes as they came off Kafka (validated when
        decoded) and are stored as they are: encoding each event again cost more than the rest
        of the store. The field is the id, so a record that left its id to its Kafka
        coordinates reads back with that id (`heldout`)."""
        by_policy: dict[str, dict[str, str | bytes]] = {}
        for n, i in enumerate(interactions):
            record = records[n] if records is not None else None
            by_policy.setdefault(i.policy_id, {})[i.event_id] = (
                record if record is not None else i.model_dump_json())
        if not by_policy:
            return
        args: list[str | bytes | int] = []
        for fields in by_policy.values():
            args.append(len(fields))
            for pair in fields.items():
                args.extend(pair)
        self._hset_many(keys=[self.keys.heldout(p) for p in by_policy], args=args)

    def paused_reasons(self, policy_ids: Sequence[str]) -> list[bytes | None]:
        """Each policy's pause reason (None: not paused), in one command."""
        if not policy_ids:
            return []
        return list(self._hget_many(keys=[self.keys.paused(p) for p in policy_ids],
                                    args=["reason"]))

    def heldout(self, policy_id: str) -> list[InteractionLogged]:
        """The policy's held-out prompts in id order, each with the id it is stored under."""
        raw = self.r.hgetall(self.keys.heldout(policy_id))
        return [InteractionLogged.model_validate({**orjson.loads(v), "event_id": _text(k)})
                for k, v in sorted(raw.items())]

    # -- evaluation scores ---------------------------------------------------------------
    def cached_score(self, policy_id: str, key: str) -> float | None:
        """A held-out score, keyed by revision and the held-out set it was measured on
        (`score_key`)."""
        raw = self.r.hget(self.keys.scores(policy_id), key)
        return float(raw) if raw is not None else None

    def cache_score(self, policy_id: str, key: str, score: float) -> None:
        self.r.hset(self.keys.scores(policy_id), key, score)

    # -- trainer checkpoints ---------------------------------------------------------------
    def set_checkpoint(self, policy_id: str, step: int) -> None:
        self.r.hset(self.keys.policy(policy_id), "checkpoint_step", step)

    def checkpoint_step(self, policy_id: str) -> int | None:
        raw = self.r.hget(self.keys.policy(policy_id), "checkpoint_step")
        return int(raw) if raw is not None else None

    # -- flow control ----------------------------------------------------------------------
    def note_sampled(self, policy_id: str) -> int:
        return self.count_many("sampled", [policy_id])[0]

    def note_trained(self, policy_id: str) -> int:
        return self.count_many("trained", [policy_id])[0]

    def count_many(self, field: str, policy_ids: Sequence[str]) -> list[int]:
        """Add one to `field` (`sampled` or `trained`) per policy id, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for policy_id in policy_ids:
            pipe.hincrby(self.keys.policy(policy_id), field, 1)
        return [int(n) for n in pipe.execute()]

    def in_flight(self, policy_id: str) -> int:
        """Groups sampled but not yet consumed by the trainer (bounds off-policy staleness)."""
        return self.in_flight_many([policy_id])[policy_id]

    def in_flight_many(self, policy_ids: Sequence[str]) -> dict[str, int]:
        """`in_flight` of several policies in one round trip: the rollout runner asks for all
        the policies of a unit it is forming at once."""
        pipe = self.r.pipeline(transaction=False)
        for policy_id in policy_ids:
            pipe.hmget(self.keys.policy(policy_id), "sampled", "trained")
        return {p: int(sampled or 0) - int(trained or 0)
                for p, (sampled, trained) in zip(policy_ids, pipe.execute(), strict=True)}
