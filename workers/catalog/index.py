"""The catalog's Redis index: one small hash per policy, rebuildable from the catalog topic.

Redis holds what must answer fast (resolve, aliases, states, content hashes), packed so that a
policy with a serving revision costs ~250 bytes at 10^6 policies; everything bulky (provenance,
evaluation details, reasons) stays on the compacted topic, and the index keeps each record's
offset so a reader fetches exactly the records it needs. Index writes are plain field sets with
no reads, so a rebuild can pipeline them; the writer applies them only after Kafka acked the
record, so the index never points at something that is not durable.

The index is the one Redis copy of every revision pointer and of the serving alias: the
pipeline's stages, the router and the residency controllers all read them here, and the only
writer is `apply` (live, after Kafka acked the record, or in a rebuild). Moving the serving alias
also moves the policy's serve name in the hot working set (`hot`), which engines follow.

Layout of `<prefix>c:<policy>` (a listpack-encoded hash while every value is ≤ 64 bytes):
`i` namespace\\0base-ref\\0lora-ref, `t` training-config ref (absent: the defaults), `o`
partition+offset of the identity record, `s`/`c`
serving/candidate revision, `r<n>` sha256 (raw) + size + step + parent + offset, `x<n>` state
code (absent = exported), `e<n>.<offset>` one per evaluation record, `g<n>` artifact collected,
`k` offset of the last rollback. Base models and LoRA configs are interned in `<prefix>cx:bases`
`<prefix>cx:loras` and `<prefix>cx:trainings` (few distinct values, shared by many policies).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from infra.settings import Settings
from workers.catalog.entries import (
    BASE,
    Lookup,
    PolicyEntry,
    Resolution,
    RevisionEntry,
    RevisionPointer,
    serve_name,
)
from workers.catalog.lifecycle import RevisionState
from workers.keys import RedisKeys

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


# KEYS[1] = policy hash, ARGV[1] = a pinned revision or "" for the serving one. Returns nil
# (unknown) or {ident, revision, packed r<n> | false, state code | false, collected 0/1}.
_LOOKUP = """
local ident = redis.call('HGET', KEYS[1], 'i')
if not ident then return nil end
local n = ARGV[1]
if n == '' then n = redis.call('HGET', KEYS[1], 's') or '0' end
if n == '0' then return {ident, 0} end
local got = redis.call('HMGET', KEYS[1], 'r' .. n, 'x' .. n, 'g' .. n)
return {ident, tonumber(n), got[1], got[2], got[3] and 1 or 0}
"""


def intern_ref(value: dict[str, Any]) -> str:
    """Short content id of an interned table value (same value, same ref)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]


class CatalogIndex:
    """Typed access to the index; `apply` turns one catalog record into field writes."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self._resolve = self.r.register_script(_RESOLVE)
        self._lookup = self.r.register_script(_LOOKUP)
        self._interned: set[tuple[str, str]] = set()
        self.keys = RedisKeys(settings)
        self.bases_key = self.keys.catalog_table("bases")
        self.loras_key = self.keys.catalog_table("loras")
        self.trainings_key = self.keys.catalog_table("trainings")
        self._tables: dict[tuple[str, str], dict[str, Any]] = {}  # content-addressed: immutable

    def key(self, policy_id: str) -> str:
        return self.keys.catalog(policy_id)

    @property
    def adapters_dir(self) -> Path:
        return self.settings.artifacts / "adapters"

    # -- writes (pipelined, no reads) ------------------------------------------------------
    def apply(self, pipe: Any, data: dict[str, Any], partition: int, offset: int) -> None:
        """Index one record (a decoded JSON dict, as on the wire) found at partition/offset; a
        serving alias move also moves the policy in the hot working set."""
        key, fields = self.fields_for(pipe, data, partition, offset)
        if fields:
            pipe.hset(key, mapping=fields)
        if data.get("kind") == "alias_moved" and data["alias"] == "serving":
            self.move_hot(pipe, data["policy_id"], data.get("previous") or 0, data["revision"],
                          float(data.get("ts") or time.time()))

    def move_hot(self, pipe: Any, policy_id: str, old: int, new: int, ts: float) -> None:
        """The hot set holds the serve name of every serving revision (score: when it began
        serving), so engines know what to keep loaded; the base model needs no entry."""
        if old and old != new:
            pipe.zrem(self.keys.hot(), serve_name(policy_id, old))
        if new:
            pipe.zadd(self.keys.hot(), {serve_name(policy_id, new): ts})

    def fields_for(self, pipe: Any, data: dict[str, Any], partition: int, offset: int
                   ) -> tuple[str, dict[str, Any]]:
        """(hash key, fields to set) for one record: only sets, so records merge and pipeline."""
        kind, key = data.get("kind"), self.key(data["policy_id"])
        if kind == "policy_registered":
            base = {"name": data["base_model"], "hash": data["base_model_hash"]}
            ref_b, ref_l = self._intern(pipe, self.bases_key, base), self._intern(
                pipe, self.loras_key, data["lora"])
            namespace = data.get("namespace", "default")
            ident = f"{namespace}\0{ref_b}\0{ref_l}"
            pipe.sadd(self.keys.catalog_namespace(namespace), data["policy_id"])
            training = {k: v for k, v in (data.get("training") or {}).items()
                        if v is not None and (k, v) != ("objective", "grpo")}
            ref_t = self._intern(pipe, self.trainings_key, training) if training else ""
            return key, {"i": ident, "t": ref_t, "o": _PTR.pack(partition, offset)}
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

    def lookup(self, policy_id: str, revision: int | None = None) -> Lookup | None:
        """Namespace and the serving (or the pinned `revision`) revision, in one round trip;
        None for a policy the catalog does not know."""
        return self.parse_lookup(policy_id, self._lookup(
            keys=[self.key(policy_id)], args=["" if revision is None else str(revision)]))

    def lookup_in(self, pipe: Any, policy_id: str, revision: int | None = None) -> None:
        """Queue `lookup` on a pipeline (so a caller can fetch more in the same round trip);
        parse its result with `parse_lookup`."""
        self._lookup(keys=[self.key(policy_id)],
                     args=["" if revision is None else str(revision)], client=pipe)

    @staticmethod
    def parse_lookup(policy_id: str, got: Any) -> Lookup | None:
        if got is None:
            return None
        namespace = got[0].decode().split("\0")[0]
        n = int(got[1])
        if n == 0:
            return Lookup(policy_id, namespace, 0, None, None)
        packed, code, collected = got[2], got[3], bool(got[4])
        state = RevisionState.from_code(code.decode()) if code else (
            RevisionState.EXPORTED if packed else None)
        sha = _REV.unpack(packed)[0].hex() if packed else None
        return Lookup(policy_id, namespace, n, sha, state, collected)

    def namespace_policies(self, namespace: str) -> list[str]:
        """Every policy id registered in `namespace`, sorted."""
        members = cast("set[bytes]", self.r.smembers(self.keys.catalog_namespace(namespace)))
        return sorted(m.decode() for m in members)

    def serving(self, policy_id: str) -> RevisionPointer:
        """The serving revision's pointer (BASE for an unknown policy or the base alias)."""
        res = self.resolve(policy_id)
        if res is None or res.revision == 0:
            return BASE
        return RevisionPointer(res.revision, sha256=res.sha256, path=str(res.path))

    def serving_names(self, policy_ids: list[str]) -> list[str | None]:
        """Each policy's serving serve name (None: the base or unknown), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for pid in policy_ids:
            pipe.hget(self.key(pid), "s")
        return [serve_name(pid, int(s)) if s and int(s) else None
                for pid, s in zip(policy_ids, pipe.execute(), strict=True)]

    def head(self, policy_id: str) -> RevisionPointer:
        """The newest recorded revision (what the rollout stage samples from), in one read."""
        fields = cast("dict[bytes, bytes]", self.r.hgetall(self.key(policy_id)))
        numbers = [int(k[1:]) for k in fields if k[:1] == b"r" and k[1:].isdigit()]
        if not numbers:
            return BASE
        return self._pointer(max(numbers), fields[b"r%d" % max(numbers)])

    def revision(self, policy_id: str, revision: int) -> RevisionPointer:
        """One revision's pointer; KeyError if the policy has no such revision."""
        if revision == 0:
            return BASE
        packed = cast("bytes | None", self.r.hget(self.key(policy_id), f"r{revision}"))
        if packed is None:
            raise KeyError(f"policy {policy_id!r} has no revision {revision}")
        return self._pointer(revision, packed)

    def _pointer(self, revision: int, packed: bytes) -> RevisionPointer:
        sha = _REV.unpack(packed)[0].hex()
        return RevisionPointer(revision, sha256=sha, path=str(self.adapters_dir / sha))

    def restore_hot_set(self, batch: int = 5000) -> int:
        """Re-derive the hot set from every policy's serving alias (a rebuild indexes records
        field by field, without `apply`); returns how many policies the index holds."""
        self.r.delete(self.keys.hot())
        ids = list(self.policy_ids())
        now = time.time()
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            pipe = self.r.pipeline(transaction=False)
            for pid in chunk:
                pipe.hget(self.key(pid), "s")
            names = {serve_name(pid, int(s)): now
                     for pid, s in zip(chunk, pipe.execute(), strict=True) if s and int(s)}
            if names:
                self.r.zadd(self.keys.hot(), names)  # type: ignore[arg-type]
        return len(ids)

    def hot_set(self) -> list[str]:
        """Serve names of every serving revision, oldest promotion first."""
        return [m.decode() for m in cast("list[bytes]", self.r.zrange(self.keys.hot(), 0, -1))]

    def exists(self, policy_id: str) -> bool:
        return bool(self.r.hexists(self.key(policy_id), "i"))

    def get(self, policy_id: str) -> PolicyEntry | None:
        fetched = cast("dict[bytes, bytes]", self.r.hgetall(self.key(policy_id)))
        raw = {k.decode(): v for k, v in fetched.items()}
        if "i" not in raw:
            return None
        namespace, ref_b, ref_l = raw["i"].decode().split("\0")
        base, lora = self.r.hget(self.bases_key, ref_b), self.r.hget(self.loras_key, ref_l)
        training = self.r.hget(self.trainings_key, raw["t"]) if "t" in raw else None
        partition, offset = _PTR.unpack(raw["o"])
        entry = PolicyEntry(
            policy_id, namespace, orjson.loads(base or b"{}"), orjson.loads(lora or b"{}"),
            partition, offset, serving=int(raw.get("s", 0)), candidate=int(raw.get("c", 0)),
            rollback_offset=_OFF.unpack(raw["k"])[0] if "k" in raw else None,
            training=orjson.loads(training or b"{}"),
        )
        for name, value in raw.items():
            if name[0] == "r" and name[1:].isdigit():
                entry.revisions[int(name[1:])] = _revision(int(name[1:]), value, raw)
        return entry

    def configs_many(self, policy_ids: list[str]
                     ) -> dict[str, tuple[dict[str, Any], dict[str, Any]] | None]:
        """Each policy's (LoRA config, training config), None for an unregistered one: one
        round trip, plus one per interned value this process has not seen yet."""
        pipe = self.r.pipeline(transaction=False)
        for pid in policy_ids:
            pipe.hmget(self.key(pid), "i", "t")
        out: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {}
        for pid, (ident, ref_t) in zip(policy_ids, pipe.execute(), strict=True):
            if ident is None:
                out[pid] = None
                continue
            ref_l = ident.decode().split("\0")[2]
            training = self._table(self.trainings_key, ref_t.decode()) if ref_t else {}
            out[pid] = (self._table(self.loras_key, ref_l), training)
        return out

    def _table(self, table: str, ref: str) -> dict[str, Any]:
        got = self._tables.get((table, ref))
        if got is None:
            raw = self.r.hget(table, ref)
            got = orjson.loads(raw) if raw else {}
            if raw:
                self._tables[(table, ref)] = got
        return got

    def policy_ids(self, match: str = "*", count: int = 1000) -> Iterator[str]:
        """Every indexed policy id (SCAN, so it never blocks Redis), unordered."""
        prefix = self.key("")
        for k in self.r.scan_iter(match=prefix + match, count=count):
            yield k.decode()[len(prefix):]

    def delete_all(self, batch: int = 5000) -> int:
        """Drop the whole index (UNLINK in batches); returns the number of keys removed."""
        removed = 0
        pipe = self.r.pipeline(transaction=False)
        for pattern in (self.key("*"), self.keys.catalog_table("*"), self.keys.hot()):
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
