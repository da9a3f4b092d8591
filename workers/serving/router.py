"""The router: a policy's request goes to an engine that holds its serving revision.

Resolution, in order:
1. a policy the pipeline does not know is refused (`UnknownPolicyError`), never silently served
   by the base model; a known policy whose serving alias is revision 0 is served by the base
   model explicitly (`Route.serve_name is None`);
2. an engine whose controller reports the serve name `active` gets the request (the demand
   score is refreshed, which keeps the adapter in that engine's working set);
3. otherwise a cold load is scheduled on the name's home engine (rendezvous order over live
   engines) and the request waits, bounded by `cold_timeout_s`, until the controller reports it
   active (`ColdLoadTimeout`) or failed (`AdapterLoadFailed`).
Because SGLang re-loads any name it has seen before, this check, not an unload, is what keeps a
retired or unknown adapter from being served.

`route_name` places an already resolved serve name (the gateway resolves a policy, a pinned
`policy@rev` or the base itself, in the same round trip that tells it the namespace). A busy
front door may cache the live-engine list for `engines_ttl_s` and refresh a demand score at most
every `touch_interval_s` per engine and name (0 = every request, the default), so a warm request
costs one Redis round trip here. A request that finds the engine no longer has its adapter
(`report_lost`) tells that engine's controller, which reloads it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from infra.settings import Settings
from schemas.errors import LorastreamError
from workers.catalog.index import CatalogIndex
from workers.serving.assignment import Residency, engine_key, live_engines, rank_engines
from workers.serving.client import AsyncSGLangClient, Generation, SGLangError

MAX_POLL_S = 0.2


def adapter_missing(exc: SGLangError) -> bool:
    """The engine refused because it does not have the named adapter (SGLang's message for a
    name it never loaded, which is every name after a restart)."""
    return exc.status in (400, 404) and "never been loaded" in exc.message


class RouterError(LorastreamError):
    """A request the router cannot place."""


class UnknownPolicyError(RouterError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown policy"


class NoEngineError(RouterError):
    """No live engine is registered."""


class ColdLoadTimeout(RouterError, TimeoutError):
    """The adapter did not become active within the request's bound."""


class AdapterLoadFailed(RouterError):
    """The engine's controller could not load the adapter (bad artifact, engine refusal)."""


@dataclass(frozen=True)
class Route:
    engine_id: str
    url: str
    serve_name: str | None
    cold: bool
    ticket: str | None = None
    """The waiting ticket a cold route holds until its request is done (`release`)."""


@dataclass
class RouterStats:
    hits: int = 0
    cold: int = 0
    base: int = 0
    cold_wait_s: list[float] = field(default_factory=list)


class Router:
    """Places requests using the controllers' published states; one per process."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, *,
                 cold_timeout_s: float = 30.0, poll_s: float = 0.01,
                 engines_ttl_s: float = 0.0, touch_interval_s: float = 0.0) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.index = CatalogIndex(settings, self.r)
        self.cold_timeout_s, self.poll_s = cold_timeout_s, poll_s
        self.engines_ttl_s, self.touch_interval_s = engines_ttl_s, touch_interval_s
        self.stats = RouterStats()
        self._clients: dict[str, AsyncSGLangClient] = {}
        self._engine_cache: tuple[float, dict[str, str]] = (0.0, {})
        self._touched: dict[tuple[str, str], float] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def serving_name(self, policy_id: str) -> str | None:
        """The serve name of the policy's serving revision; None = its alias is the base."""
        resolved = self.index.resolve(policy_id)
        if resolved is None:
            raise UnknownPolicyError(f"unknown policy {policy_id!r}: it is not in the catalog")
        return resolved.serve_name if resolved.revision > 0 else None

    async def route(self, policy_id: str) -> Route:
        return await self.route_name(self.serving_name(policy_id))

    def states_in(self, pipe: Any, name: str) -> list[str]:
        """Queue the residency states of `name` on the cached live engines (none cached: none
        queued) on a pipeline; returns those engines, in the order their states come back.
        A caller that fetches them with its own lookup passes them to `route_name`."""
        fetched_at, cached = self._engine_cache
        if not cached or time.monotonic() - fetched_at >= self.engines_ttl_s:
            return []
        engines = sorted(cached)
        for engine in engines:
            pipe.hget(engine_key(self.settings, engine, "states"), name)
        return engines

    async def route_name(self, name: str | None,
                         prefetched: dict[str, str | None] | None = None) -> Route:
        """Place a resolved serve name (None: the bare base model) on an engine holding it,
        or wait, bounded, for its scheduled cold load. `prefetched`: the name's states per
        engine, fetched by the caller (`states_in`), saving a round trip."""
        engines = await self._engines()
        if name is None:
            self.stats.base += 1
            engine = random.choice(sorted(engines))
            return Route(engine, engines[engine], None, cold=False)
        ranked = rank_engines(name, engines)
        if prefetched is not None and all(e in prefetched for e in ranked):
            states = [prefetched[e] for e in ranked]
        else:
            states = self._states(name, ranked)
        holders = [e for e, s in zip(ranked, states, strict=True) if s == Residency.ACTIVE]
        if holders:
            self.stats.hits += 1
            engine = holders[0]
            self._touch(engine, name)
            return Route(engine, engines[engine], name, cold=False)
        self.stats.cold += 1
        started = time.perf_counter()
        engine = ranked[0]
        ticket = f"{name}|{uuid.uuid4().hex}"
        self.r.zadd(engine_key(self.settings, engine, "waiting"), {ticket: time.time()})
        try:
            await self._wait_active(engine, name)
        except BaseException:
            self.r.zrem(engine_key(self.settings, engine, "waiting"), ticket)
            raise
        self.stats.cold_wait_s.append(time.perf_counter() - started)
        return Route(engine, engines[engine], name, cold=True, ticket=ticket)

    def report_lost(self, route: Route) -> None:
        """The engine answered that it does not have the route's adapter (it restarted or
        evicted it behind its controller's back): its controller reloads it."""
        if route.serve_name is not None:
            self.r.sadd(engine_key(self.settings, route.engine_id, "lost"), route.serve_name)
            self.forget_engines()

    def forget_engines(self) -> None:
        """Drop the cached live-engine list (an engine stopped answering)."""
        self._engine_cache = (0.0, {})

    def release(self, route: Route) -> None:
        """A cold route's request is done: it no longer holds its adapter in the working set."""
        if route.ticket is not None:
            self.r.zrem(engine_key(self.settings, route.engine_id, "waiting"), route.ticket)

    async def _engines(self) -> dict[str, str]:
        """Live engines (cached up to `engines_ttl_s`); while none is registered (e.g. at
        start-up) wait, bounded."""
        fetched_at, cached = self._engine_cache
        if cached and time.monotonic() - fetched_at < self.engines_ttl_s:
            return cached
        deadline = time.monotonic() + self.cold_timeout_s
        while not (engines := live_engines(self.settings, self.r)):
            if time.monotonic() >= deadline:
                raise NoEngineError(f"no live engine registered within {self.cold_timeout_s} s")
            await asyncio.sleep(self.poll_s)
        self._engine_cache = (time.monotonic(), engines)
        return engines

    def _states(self, name: str, engines: list[str]) -> list[str | None]:
        pipe = self.r.pipeline(transaction=False)
        for engine in engines:
            pipe.hget(engine_key(self.settings, engine, "states"), name)
        return [s.decode() if s is not None else None for s in pipe.execute()]

    def _touch(self, engine: str, name: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.touch_interval_s > 0:
            if now - self._touched.get((engine, name), -1e9) < self.touch_interval_s:
                return
            if len(self._touched) > 100_000:  # bounded: forget old touches wholesale
                self._touched.clear()
            self._touched[(engine, name)] = now
        self.r.zadd(engine_key(self.settings, engine, "demand"), {name: time.time()})

    async def _wait_active(self, engine: str, name: str) -> None:
        """Schedule the cold load and wait for the controller's verdict, bounded."""
        key = engine_key(self.settings, engine, "states")
        self._touch(engine, name, force=True)
        deadline = time.monotonic() + self.cold_timeout_s
        interval = self.poll_s
        while True:
            raw = cast("bytes | None", self.r.hget(key, name))
            state = raw.decode() if raw is not None else None
            if state == Residency.ACTIVE:
                return
            if state == Residency.FAILED:  # the controller retries later; this request fails now
                error = cast("bytes | None",
                             self.r.hget(engine_key(self.settings, engine, "errors"), name))
                raise AdapterLoadFailed(f"{name} failed to load on {engine}: "
                                        f"{error.decode() if error else 'unknown error'}")
            if time.monotonic() >= deadline:
                raise ColdLoadTimeout(f"{name} was not active on {engine} within "
                                      f"{self.cold_timeout_s} s (last state: {state})")
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_S)  # many waiters must not flood Redis

    def client(self, url: str) -> AsyncSGLangClient:
        """The one pooled client of an engine URL (closed by `close`)."""
        if url not in self._clients:
            self._clients[url] = AsyncSGLangClient(url)
        return self._clients[url]

    async def generate(self, policy_id: str, prompts: str | Sequence[str], *,
                       sampling_params: dict[str, Any] | None = None,
                       return_logprob: bool = True) -> list[Generation]:
        """Generate with the policy's serving revision, wherever it is (or gets) loaded."""
        for attempt in range(2):
            route = await self.route(policy_id)
            try:
                return await self.client(route.url).generate(
                    prompts, lora_path=route.serve_name, sampling_params=sampling_params,
                    return_logprob=return_logprob)
            except SGLangError as exc:
                # Lost a race with an unload, or the engine restarted: re-route.
                if not adapter_missing(exc):
                    raise
                self.report_lost(route)
                if attempt == 1:
                    raise
            finally:
                self.release(route)
        raise AssertionError("unreachable")
