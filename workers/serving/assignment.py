"""Who should hold what: engine membership and per-engine assignments in Redis.

Keys (built in `workers/keys.py`):
- `engines` hash: engine id -> base URL; `engine:<id>:alive` expires unless the engine's
  controller keeps refreshing it, so a dead engine stops receiving work.
- `engine:<id>:assigned` zset: the engine's share of the hot set (`…:hot`), written by
  `assign_hot_set`; score = promotion time (newer = more important).
- `engine:<id>:demand` zset: serve names requests asked this engine for (the router's cold
  loads); score = time of the latest request, so the demand share is LRU by use.
- `engine:<id>:waiting` zset: one ticket `<serve name>|<request id>` per request waiting for
  a cold load, score = when it started waiting; removed when the request is done.
- `engine:<id>:pinned` set: serve names loaded with `pinned=true` (never LRU-evicted).
- `engine:<id>:states` hash: serve name -> residency state, published by the controller and
  read by the router; `engine:<id>:errors` hash: serve name -> why it failed.

A serve name's home engine is chosen by rendezvous hashing over the live engines, so every
process computes the same placement without coordination and an engine joining or leaving moves
only its own share.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import cast

import redis

from infra.settings import Settings
from workers.keys import RedisKeys

ALIVE_TTL_S = 10


class Residency(StrEnum):
    """An adapter's state on one engine, as its controller publishes it in `states` (the
    machine itself lives in `workers/serving/residency.py`)."""

    QUEUED = "queued"
    LOADING = "loading"
    ACTIVE = "active"
    DRAINING = "draining"
    EVICTED = "evicted"
    FAILED = "failed"


def engine_key(settings: Settings, engine_id: str, what: str) -> str:
    return RedisKeys(settings).engine(engine_id, what)


def rank_engines(name: str, engines: Iterable[str]) -> list[str]:
    """Rendezvous (highest random weight) order of engines for one serve name."""
    def weight(engine: str) -> bytes:
        return hashlib.blake2b(f"{engine}|{name}".encode(), digest_size=8).digest()

    return sorted(engines, key=weight, reverse=True)


def register_engine(settings: Settings, r: redis.Redis, engine_id: str, url: str) -> None:
    """Announce (and keep alive) one engine; called by its controller on every tick."""
    pipe = r.pipeline(transaction=False)
    pipe.hset(RedisKeys(settings).engines(), engine_id, url)
    pipe.set(engine_key(settings, engine_id, "alive"), 1, ex=ALIVE_TTL_S)
    pipe.execute()


def deregister_engine(settings: Settings, r: redis.Redis, engine_id: str) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.hdel(RedisKeys(settings).engines(), engine_id)
    pipe.delete(engine_key(settings, engine_id, "alive"), engine_key(settings, engine_id,
                                                                     "states"))
    pipe.execute()


def live_engines(settings: Settings, r: redis.Redis) -> dict[str, str]:
    """engine id -> URL of engines whose controller refreshed `alive` recently."""
    stored = cast("dict[bytes, bytes]", r.hgetall(RedisKeys(settings).engines()))
    raw = {k.decode(): v.decode() for k, v in stored.items()}
    if not raw:
        return {}
    ids = sorted(raw)
    alive = r.mget([engine_key(settings, e, "alive") for e in ids])
    return {e: raw[e] for e, a in zip(ids, alive, strict=True) if a is not None}


def assign_hot_set(settings: Settings, r: redis.Redis, capacity: int) -> dict[str, list[str]]:
    """Split the newest hot serve names over live engines, at most `capacity` per engine.

    Only the newest `capacity * engines` hot names are placed (the rest are served on demand);
    a name whose home engine is full goes to its next engine in rendezvous order. Idempotent:
    every controller may run it; the same inputs always give the same assignment.
    """
    engines = sorted(live_engines(settings, r))
    if not engines:
        return {}
    hot = cast("list[tuple[bytes, float]]", r.zrevrange(
        RedisKeys(settings).hot(), 0, capacity * len(engines) - 1, withscores=True))
    shares: dict[str, dict[str, float]] = {e: {} for e in engines}
    for member, score in hot:
        name = member.decode()
        for engine in rank_engines(name, engines):
            if len(shares[engine]) < capacity:
                shares[engine][name] = score
                break
    pipe = r.pipeline(transaction=True)
    for engine, share in shares.items():
        key = engine_key(settings, engine, "assigned")
        pipe.delete(key)
        if share:
            pipe.zadd(key, share)
    pipe.execute()
    return {e: list(s) for e, s in shares.items()}


def request_load(settings: Settings, r: redis.Redis, engine_id: str, name: str) -> None:
    """Record demand for `name` on `engine_id` (its controller schedules a cold load)."""
    r.zadd(engine_key(settings, engine_id, "demand"), {name: time.time()})


def set_pinned(settings: Settings, r: redis.Redis, engine_id: str, name: str,
               pinned: bool) -> None:
    key = engine_key(settings, engine_id, "pinned")
    if pinned:
        r.sadd(key, name)
    else:
        r.srem(key, name)
