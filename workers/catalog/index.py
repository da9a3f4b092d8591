"""The catalog's Redis index: one small hash per policy, rebuildable from the catalog topic.

Redis holds what must answer fast (resolve, aliases, states, content hashes), packed so that a
policy with a serving revision costs ~250 bytes at 10^6 policies; everything bulky (provenance,
evaluation details, reasons) stays on the compacted topic, and the index keeps each record's
offset so a reader fetches exactly the records it needs. Index writes are plain field sets with
no reads, so a rebuild can pipeline them; the writer applies them only after Kafka acked the
record, so the index never points at something that is not durable.

Layout of `<prefix>c:<policy>` (a listpack-encoded hash while every value is ≤ 64 bytes):
`i` namespace\\0base-ref\\0lora-ref, `o` partition+offset of the identity record, `s`/`c`
serving/candidate revision, `r<n>` sha256 (raw) + size + step + parent + offset, `x<n>` state
code (absent = exported), `e<n>.<offset>` one per evaluation record, `g<n>` artifact collected,
`k` offset of the last rollback. Base models and LoRA configs are interned in `<prefix>cx:bases`
and `<prefix>cx:loras` (few distinct values, shared by many policies).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from infra.settings import Settings
from workers.catalog.lifecycle import RevisionState

_REV = struct.Struct("<32sQIIQ")  # sha256, size_bytes, step, parent, offset
_PTR = struct.Struct("<HQ")  # partition, offset
_OFF = struct.Struct("<Q")

# KEYS[1] = policy hash. Returns nil (unknown), {0} (base) or {revision, packed r<n>}.
_RESOLVE = """
local s = redis.call('HGET', KEYS[1], 's')
if not s then
  if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
  return {0}
end
if s == '0' then return {0} end
return {tonumber(s), redis.call('HGET', KEYS[1], 'r' .. s)}
"""


def intern_ref(value: dict[str, Any]) -> str:
    """Short content id of an interned table value (same value, same ref)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]


@dataclass(frozen=True)
class Resolution:
    """Where a policy is served from: revision 0 means the bare base model."""

    policy_id: str
    revision: int
    sha256: str | None
    path: Path | None

    @property
    def serve_name(self) -> str:
        return f"{self.policy_id}@{self.revision}"


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
    candidate: int = 0
    rollback_offset: int | None = None
    revisions: dict[int, RevisionEntry] = field(default_factory=dict)

    @property
    def head(self) -> int:
        return max(self.revisions, default=0)


class CatalogIndex:
    """Typed access to the index; `apply` turns one catalog record into field writes."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self._resolve = self.r.register_script(_RESOLVE)
        self._interned: set[tuple[str, str]] = set()
        self.bases_key = settings.key("cx", "bases")
        self.loras_key = settings.key("cx", "loras")

    def key(self, policy_id: str) -> str:
        return self.settings.key("c", policy_id)

    @property
    def adapters_dir(self) -> Path:
        return self.settings.artifacts / "adapters"

    # -- writes (pipelined, no reads) ------------------------------------------------------
    def apply(self, pipe: Any, data: dict[str, Any], partition: int, offset: int) -> None:
        """Index one record (a decoded JSON dict, as on the wire) found at partition/offset."""
        key, fields = self.fields_for(pipe, data, partition, offset)
        if fields:
            pipe.hset(key, mapping=fields)

    def fields_for(self, pipe: Any, data: dict[str, Any], partition: int, offset: int
                   ) -> tuple[str, dict[str, Any]]:
        """(hash key, fields to set) for one record: only sets, so records merge and pipeline."""
        kind, key = data.get("kind"), self.key(data["policy_id"])
        if kind == "policy_registered":
            base = {"name": data["base_model"], "hash": data["base_model_hash"]}
            ref_b, ref_l = self._intern(pipe, self.bases_key, base), self._intern(
                pipe, self.loras_key, data["lora"])
            ident = f"{data.get('namespace', 'default')}\0{ref_b}\0{ref_l}"
            return key, {"i": ident, "o": _PTR.pack(partition, offset)}
        if kind == "revision_recorded":
            n, prov = data["revision"], data["provenance"]
            packed = _REV.pack(bytes.fromhex(data["sha256"]), data["size_bytes"], data["step"],
                               prov["parent_revision"], offset)
            return key, {f"r{n}": packed}
        if kind == "revision_evaluated":
            return key, {f"e{data['revision']}.{offset}": b""}  # one field per evaluation
        if kind == "revision_state_changed":
            return key, {f"x{data['revision']}": RevisionState(data["state"]).code}
        if kind == "alias_moved":
            return key, {"s" if data["alias"] == "serving" else "c": data["revision"]}
        if kind == "policy_rolled_back":
            return key, {"k": _OFF.pack(offset)}
        if kind == "artifact_collected":
            return key, {f"g{data['revision']}": 1}
        return key, {}  # a kind this version does not index: readers ignore it

    def _intern(self, pipe: Any, table: str, value: dict[str, Any]) -> str:
        ref = intern_ref(value)
        if (table, ref) not in self._interned:
            pipe.hset(table, ref, orjson.dumps(value))
            self._interned.add((table, ref))
        return ref

    def forget_interned(self) -> None:
        """After the index was deleted, interned table rows must be written again."""
        self._interned.clear()

    # -- reads -------------------------------------------------------------------------------
    def resolve(self, policy_id: str) -> Resolution | None:
        """Policy id → serving revision and artifact location, in one round trip."""
        got = self._resolve(keys=[self.key(policy_id)])
        if got is None:
            return None
        if int(got[0]) == 0 or got[1] is None:
            return Resolution(policy_id, 0, None, None)
        sha = _REV.unpack(got[1])[0].hex()
        return Resolution(policy_id, int(got[0]), sha, self.adapters_dir / sha)

    def exists(self, policy_id: str) -> bool:
        return bool(self.r.hexists(self.key(policy_id), "i"))

    def get(self, policy_id: str) -> PolicyEntry | None:
        fetched = cast("dict[bytes, bytes]", self.r.hgetall(self.key(policy_id)))
        raw = {k.decode(): v for k, v in fetched.items()}
        if "i" not in raw:
            return None
        namespace, ref_b, ref_l = raw["i"].decode().split("\0")
        base, lora = self.r.hget(self.bases_key, ref_b), self.r.hget(self.loras_key, ref_l)
        partition, offset = _PTR.unpack(raw["o"])
        entry = PolicyEntry(
            policy_id, namespace, orjson.loads(base or b"{}"), orjson.loads(lora or b"{}"),
            partition, offset, serving=int(raw.get("s", 0)), candidate=int(raw.get("c", 0)),
            rollback_offset=_OFF.unpack(raw["k"])[0] if "k" in raw else None,
        )
        for name, value in raw.items():
            if name[0] == "r" and name[1:].isdigit():
                entry.revisions[int(name[1:])] = _revision(int(name[1:]), value, raw)
        return entry

    def policy_ids(self, match: str = "*", count: int = 1000) -> Iterator[str]:
        """Every indexed policy id (SCAN, so it never blocks Redis), unordered."""
        prefix = self.key("")
        for k in self.r.scan_iter(match=prefix + match, count=count):
            yield k.decode()[len(prefix):]

    def delete_all(self, batch: int = 5000) -> int:
        """Drop the whole index (UNLINK in batches); returns the number of keys removed."""
        removed = 0
        pipe = self.r.pipeline(transaction=False)
        for pattern in (self.key("*"), self.settings.key("cx", "*")):
            for k in self.r.scan_iter(match=pattern, count=batch):
                pipe.unlink(k)
                removed += 1
                if removed % batch == 0:
                    pipe.execute()
        pipe.execute()
        self.forget_interned()
        return removed


def _revision(n: int, packed: bytes, raw: dict[str, bytes]) -> RevisionEntry:
    sha, size, step, parent, offset = _REV.unpack(packed)
    prefix = f"e{n}."
    evals = sorted(int(name[len(prefix):]) for name in raw if name.startswith(prefix))
    code = raw.get(f"x{n}")
    return RevisionEntry(
        revision=n, sha256=sha.hex(), size_bytes=size, step=step, parent=parent, offset=offset,
        state=RevisionState.from_code(code.decode()) if code else RevisionState.EXPORTED,
        eval_offsets=tuple(evals),
        collected=f"g{n}" in raw,
    )
