"""The residency controller: one per engine, reconciling its loaded set with Redis.

Each adapter the controller knows moves through an explicit state machine:

    queued -> loading -> active -> draining -> evicted      (and loading -> failed)

Cold loads are scheduled work: wanted adapters enter a priority queue (pinned > demanded by a
waiting request > hot-set share; newer first within a class) and at most `max_concurrent_loads`
run at once, so a wave of activations is queued, not stampeded onto the engine. Before a load
the artifact's sha256 is checked against its content address. The engine's `loaded_adapters`
(in every load/unload answer) is authoritative: an adapter the engine evicted by LRU becomes
`evicted` here. States are published to Redis for the router.

An engine that restarts (SGLang after a crash, an upgrade) comes back with no adapters, and
SGLang answers a name it has not loaded since with a 400, never with the base model. The
controller notices three ways and reloads what is still wanted: `/health` failing (every active
adapter becomes evicted and the engine leaves the live set until it answers again), the
engine's `/v1/models` no longer listing an active adapter (checked every `probe_interval_s`,
once the engine has shown that it lists adapters), and a router reporting that a request found
an adapter missing (`engine:<id>:lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis

from infra.settings import Settings
from workers.artifacts.store import ArtifactStore
from workers.catalog.index import CatalogIndex
from workers.serving import metrics
from workers.serving.assignment import Residency, assign_hot_set, engine_key, register_engine
from workers.serving.client import AsyncSGLangClient, SGLangError

log = logging.getLogger(__name__)


ALLOWED: dict[Residency | None, frozenset[Residency]] = {
    None: frozenset({Residency.QUEUED}),
    Residency.QUEUED: frozenset({Residency.LOADING, Residency.EVICTED}),
    Residency.LOADING: frozenset({Residency.ACTIVE, Residency.FAILED}),
    Residency.ACTIVE: frozenset({Residency.DRAINING, Residency.EVICTED}),
    Residency.DRAINING: frozenset({Residency.EVICTED}),
    Residency.EVICTED: frozenset({Residency.QUEUED}),
    Residency.FAILED: frozenset({Residency.QUEUED}),
}
PRIORITY_HOT, PRIORITY_DEMAND, PRIORITY_WAITING, PRIORITY_PINNED = 1, 2, 3, 4
WAITING_STALE_S = 300.0
"""A waiting ticket older than this is a crashed router's leftover and is dropped."""


class TransitionError(RuntimeError):
    """A state change the machine does not allow: a controller bug, never silently applied."""


@dataclass
class Tracked:
    name: str
    state: Residency
    pinned: bool = False
    error: str = ""
    failed_at: float = 0.0


@dataclass(frozen=True)
class ControllerConfig:
    engine_id: str
    engine_url: str
    capacity: int = 8
    max_concurrent_loads: int = 2
    interval_s: float = 0.1
    demand_ttl_s: float = 300.0
    retry_failed_after_s: float = 30.0
    probe_interval_s: float = 1.0


class ResidencyController:
    """Follows `engine:<id>:{assigned,demand,pinned}` by loading/unloading via SGLang's API."""

    def __init__(self, settings: Settings, config: ControllerConfig,
                 client: redis.Redis | None = None) -> None:
        self.settings, self.config = settings, config
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.index = CatalogIndex(settings, self.r)
        self.store = ArtifactStore.for_settings(settings)
        token = settings.engine_admin_token
        self.engine = AsyncSGLangClient(
            config.engine_url, api_key=token.get_secret_value() if token else None)
        self.tracked: dict[str, Tracked] = {}
        self._queue: list[tuple[int, float, int, str]] = []
        self._seq = itertools.count()
        self._loading = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty: set[str] = set()
        self.loads_done = 0
        self.engine_up = True
        self.lists_adapters = False
        self._probed_at = 0.0

    def _key(self, what: str) -> str:
        return engine_key(self.settings, self.config.engine_id, what)

    def transition(self, name: str, new: Residency, error: str = "") -> Tracked:
        item = self.tracked.get(name)
        old = item.state if item else None
        if new not in ALLOWED[old]:
            raise TransitionError(f"{name}: {old} -> {new} is not allowed")
        if item is None:
            item = self.tracked[name] = Tracked(name, new)
        item.state, item.error = new, error
        if new is Residency.FAILED:
            item.failed_at = time.monotonic()
        self._dirty.add(name)
        return item

    # -- desired set -------------------------------------------------------------------------
    def desired(self) -> dict[str, tuple[int, float]]:
        """serve name -> (priority class, rank within class), trimmed to the engine's capacity.

        Classes, strongest first: pinned; requests waiting for a cold load right now (oldest
        first, so a wave is served in arrival order); recent demand (LRU by use); hot share.
        """
        now = time.time()
        self.r.zremrangebyscore(self._key("demand"), "-inf", now - self.config.demand_ttl_s)
        pipe = self.r.pipeline(transaction=False)
        pipe.zrange(self._key("assigned"), 0, -1, withscores=True)
        pipe.zrange(self._key("demand"), 0, -1, withscores=True)
        pipe.smembers(self._key("pinned"))
        pipe.zremrangebyscore(self._key("waiting"), "-inf", now - WAITING_STALE_S)
        pipe.zrange(self._key("waiting"), 0, -1, withscores=True)
        assigned, demand, pinned, _, waiting = pipe.execute()
        demand = self._current(demand)
        want: dict[str, tuple[int, float]] = {}
        for members, prio in ((assigned, PRIORITY_HOT), (demand, PRIORITY_DEMAND)):
            for m, score in members:
                want[m.decode()] = max(want.get(m.decode(), (0, 0.0)), (prio, score))
        for ticket, since in waiting:  # requests waiting now: oldest first (FIFO fairness)
            name = ticket.decode().partition("|")[0]
            want[name] = max(want.get(name, (0, 0.0)), (PRIORITY_WAITING, -since))
        for m in pinned:
            want[m.decode()] = (PRIORITY_PINNED, now)
        ranked = sorted(want.items(), key=lambda kv: kv[1], reverse=True)
        return dict(ranked[: self.config.capacity])

    def _current(self, demand: list[tuple[bytes, float]]) -> list[tuple[bytes, float]]:
        """Demand only counts for serving revisions: a superseded one must drain."""
        if not demand:
            return demand
        policies = [m.decode().rpartition("@")[0] for m, _ in demand]
        serving = self.index.serving_names(policies)
        stale = [m for (m, _), cur in zip(demand, serving, strict=True) if cur != m.decode()]
        if stale:
            self.r.zrem(self._key("demand"), *stale)
        return [(m, score) for (m, score), cur in zip(demand, serving, strict=True)
                if cur == m.decode()]

    # -- reconcile ---------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """One pass: check the engine, register, assign, queue wanted loads, drain unwanted
        adapters, publish."""
        if time.monotonic() - self._probed_at >= self.config.probe_interval_s:
            self._probed_at = time.monotonic()
            await self.probe()
        if not self.engine_up:
            self.publish()
            return
        self._take_lost()
        register_engine(self.settings, self.r, self.config.engine_id, self.config.engine_url)
        assign_hot_set(self.settings, self.r, self.config.capacity)
        want = self.desired()
        pinned = {n for n, (prio, _) in want.items() if prio == PRIORITY_PINNED}
        for name, (prio, recency) in want.items():
            item = self.tracked.get(name)
            if item is not None and item.state is Residency.ACTIVE and item.pinned != (
                    name in pinned):
                self._drain(name)  # re-pin = unload, then load with the new flag
            elif item is None or item.state is Residency.EVICTED or (
                    item.state is Residency.FAILED and self._retry_due(item)):
                self.transition(name, Residency.QUEUED)
                self.tracked[name].pinned = name in pinned
                heapq.heappush(self._queue, (-prio, -recency, next(self._seq), name))
        for name, item in list(self.tracked.items()):
            if name in want:
                continue
            if item.state is Residency.QUEUED:
                self.transition(name, Residency.EVICTED)
            elif item.state is Residency.ACTIVE:
                self._drain(name)
        self._start_loads()
        self.publish()

    # -- engine restarts ---------------------------------------------------------------------
    async def probe(self) -> None:
        """Is the engine up, and does it still hold every adapter we think is active?"""
        before = {n for n, t in self.tracked.items() if t.state is Residency.ACTIVE}
        listing: list[dict[str, Any]] | None
        try:
            listing = await self.engine.models()
        except SGLangError:  # it answers, but not with a model list: only /health tells
            listing = [] if await self.engine.health() else None
        except (OSError, TimeoutError, aiohttp.ClientError):
            listing = None
        if listing is None:
            if self.engine_up:
                log.warning("engine %s is down: its adapters count as lost",
                            self.config.engine_id)
                self.engine_up = False
                self.r.delete(self._key("alive"))  # routers stop sending it work now
            self._lose(before, "engine down")
            return
        if not self.engine_up:
            log.info("engine %s answers again: reloading its assignment", self.config.engine_id)
        self.engine_up = True
        listed = {str(m.get("id")) for m in listing if m.get("parent") is not None}
        self.lists_adapters = self.lists_adapters or bool(listed)
        if self.lists_adapters:
            still = {n for n, t in self.tracked.items() if t.state is Residency.ACTIVE}
            self._lose((before & still) - listed, "no longer listed by the engine")

    def _take_lost(self) -> None:
        """Names routers found missing on the engine (`Router.report_lost`)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.smembers(self._key("lost"))
        pipe.delete(self._key("lost"))
        lost = {m.decode() for m in pipe.execute()[0]}
        self._lose(lost, "a request found it missing")

    def _lose(self, names: set[str], why: str) -> None:
        for name in sorted(names):
            item = self.tracked.get(name)
            if item is not None and item.state is Residency.ACTIVE:
                log.warning("%s lost on %s (%s): reloading", name, self.config.engine_id, why)
                self.transition(name, Residency.EVICTED)

    def _retry_due(self, item: Tracked) -> bool:
        return time.monotonic() - item.failed_at >= self.config.retry_failed_after_s

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_loads(self) -> None:
        """Move queued adapters to loading, highest priority first, within the load bound."""
        while self._queue and self._loading < self.config.max_concurrent_loads:
            _, _, _, name = heapq.heappop(self._queue)
            item = self.tracked.get(name)
            if item is None or item.state is not Residency.QUEUED:
                continue  # cancelled (evicted) while queued
            self.transition(name, Residency.LOADING)
            self._loading += 1
            self._spawn(self._load(name))

    async def _load(self, name: str) -> None:
        try:
            outcome, error = await self._try_load(name)
            self.transition(name, outcome, error)
        finally:
            self._loading -= 1
            self._start_loads()
            self.publish()

    async def _try_load(self, name: str) -> tuple[Residency, str]:
        try:
            path = await asyncio.to_thread(self.verified_path, name)
            update = await self.engine.load_lora_adapter(name, path, self.tracked[name].pinned)
        except SGLangError as exc:
            if "already loaded" in exc.message:  # e.g. after a controller restart
                return Residency.ACTIVE, ""
            return Residency.FAILED, exc.message
        except (OSError, ValueError, KeyError, TimeoutError, aiohttp.ClientError) as exc:
            return Residency.FAILED, f"{type(exc).__name__}: {exc}"
        self.loads_done += 1
        metrics.note_cold_load(self.config.engine_id)
        self._observe(update.loaded_adapters)
        return Residency.ACTIVE, ""

    def verified_path(self, name: str) -> str:
        """Artifact dir of a serve name, only if its weights still hash to their address."""
        policy, _, rev = name.rpartition("@")
        pointer = self.index.revision(policy, int(rev))
        if pointer.sha256 is None:
            raise ValueError(f"{name} has no artifact")
        if not self.store.verify(pointer.sha256):
            raise ValueError(f"{name}: artifact {pointer.sha256} failed its sha256 check")
        return str(self.store.adapter_path(pointer.sha256))

    def _drain(self, name: str) -> None:
        self.transition(name, Residency.DRAINING)
        self._spawn(self._unload(name))

    async def _unload(self, name: str) -> None:
        """SGLang's unload waits for in-flight requests, so draining is safe for them."""
        try:
            update = await self.engine.unload_lora_adapter(name)
            self._observe(update.loaded_adapters)
        except SGLangError as exc:  # already gone from the engine (e.g. LRU): still evicted
            log.info("unload of %s: %s", name, exc.message)
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:  # engine down: gone too
            log.info("unload of %s: engine unreachable (%s)", name, exc)
        if self.tracked[name].state is Residency.DRAINING:
            self.transition(name, Residency.EVICTED)
        self.publish()

    def _observe(self, loaded: dict[str, str]) -> None:
        """The engine's registry is authoritative: what it evicted is evicted here."""
        for name, item in self.tracked.items():
            if item.state is Residency.ACTIVE and name not in loaded:
                self.transition(name, Residency.EVICTED)

    def publish(self) -> None:
        if not self._dirty:
            return
        self._export_metrics()
        states = {n: self.tracked[n].state.value for n in self._dirty}
        errors = {n: self.tracked[n].error for n in self._dirty if self.tracked[n].error}
        self._dirty.clear()
        pipe = self.r.pipeline(transaction=False)
        # redis-py's stub wants a Mapping keyed by its full union (invariant keys): str is fine.
        pipe.hset(self._key("states"), mapping=states)  # type: ignore[arg-type]
        if errors:
            pipe.hset(self._key("errors"), mapping=errors)  # type: ignore[arg-type]
        pipe.execute()

    def _export_metrics(self) -> None:
        """Adapters per residency state, and the working set this engine holds or is loading."""
        engine = self.config.engine_id
        counts = Counter(item.state for item in self.tracked.values())
        for state in Residency:
            metrics.set_residency(engine, state.value, counts.get(state, 0))
        held = (Residency.QUEUED, Residency.LOADING, Residency.ACTIVE)
        metrics.set_hot_set(engine, sum(counts.get(s, 0) for s in held))

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set; then wait for running work."""
        try:
            while not stop.is_set():
                await self.reconcile()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.interval_s)
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.engine.close()
