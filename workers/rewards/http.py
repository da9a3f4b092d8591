"""A reward model or judge over HTTP: scores come from an endpoint, never from a guess.

One call carries up to `max_groups_per_call` rollout groups (a group's completions always
travel together) and at most `max_concurrency` calls are in flight per process, all as
coroutines on the caller's event loop, so a slow judge never blocks it:

    POST <url>  {"reward": "<name>", "groups": [{"interaction_id", "policy_id", "prompt",
                 "completions": [...], "reference", "response", "feedback", "task_params"}]}
    200         {"scores": [[float per completion] per group]}

A call that times out, cannot connect, or answers 5xx/429 (or any status but 200, 400 and 422)
is retried with exponential backoff and jitter; after `retries` more attempts its groups fail
with `RetryableError`, which the runner dead-letters as retryable, so a failure is never a
zero reward. A 400 or 422 is the judge refusing those groups: `PoisonEventError`. An answer
of the wrong shape or with a non-finite score fails its groups as retryable (the judge's
fault, not the event's). A circuit breaker counts consecutive failed calls; at
`breaker_failures` it opens and calls fail fast for `breaker_reset_s`, then one trial call
decides whether it closes again, so a dead judge costs neither its timeouts on every group
nor load it cannot take.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from infra.settings import RewardEndpoint
from schemas.errors import PoisonEventError, RetryableError
from schemas.events import InteractionLogged
from workers.rewards.registry import SCORE_SECONDS

Group = tuple[InteractionLogged, Sequence[str]]
Result = list[float] | Exception


class _Transient(Exception):
    """A failed call worth retrying."""


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failed calls -> half-open after `reset_s`
    (one trial call at a time) -> closed on a success, open again on a failure.

    Thread-safe: the reward stage calls from the event loop, evaluation from the model thread.
    """

    def __init__(self, failures: int, reset_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self.clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one trial is let through."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.reset_s or self._trial:
                return False
            self._trial = True
            return True

    def success(self) -> None:
        with self._lock:
            self._consecutive, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._trial or self._consecutive >= self.failures:
                self._opened_at, self._trial = self.clock(), False


@dataclass
class _Client:
    """A session and the call limit for one event loop (aiohttp sessions are loop-bound)."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    slots: asyncio.Semaphore


class HttpReward:
    """An HTTP judge as a `workers.rewards.registry.Reward`."""

    times_groups = True
    """It observes its calls' latencies in `lorastream_reward_seconds` (each group of a call
    has the call's latency), not the whole unit's."""

    def __init__(self, name: str, endpoint: RewardEndpoint) -> None:
        self.name, self.version, self.source = name, endpoint.version, endpoint.url
        self.endpoint = endpoint
        self.breaker = CircuitBreaker(endpoint.breaker_failures, endpoint.breaker_reset_s)
        self.calls = 0
        """Calls made (attempts included): for tests and benchmarks."""
        self._client: _Client | None = None

    async def score_many(self, groups: Sequence[Group]) -> list[Result]:
        if not groups:
            return []
        client, own = self._client_for_loop()
        size = self.endpoint.max_groups_per_call
        chunks = [groups[i:i + size] for i in range(0, len(groups), size)]
        started = time.perf_counter()
        try:
            answers = await asyncio.gather(*(self._timed(client, c, started) for c in chunks))
        finally:
            if own:
                await client.session.close()
        return [r for answer in answers for r in answer]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.session.close()
            self._client = None

    def _client_for_loop(self) -> tuple[_Client, bool]:
        """The persistent client of the loop that called first (the stage's loop); any other
        loop (a synchronous caller's `asyncio.run`) gets its own, closed after the call."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client.loop is loop:
            return self._client, False
        limit = self.endpoint.max_concurrency
        client = _Client(loop, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s)),
            asyncio.Semaphore(limit))
        if self._client is None or self._client.loop.is_closed():
            self._client = client
            return client, False
        return client, True

    async def _timed(self, client: _Client, chunk: Sequence[Group],
                     started: float) -> list[Result]:
        results = await self._call(client, chunk)
        SCORE_SECONDS.labels(reward=self.name).observe(time.perf_counter() - started)
        return results

    async def _call(self, client: _Client, chunk: Sequence[Group]) -> list[Result]:
        """One call for `chunk`, retried; every group gets its scores or its failure."""
        body = orjson.dumps({"reward": self.name, "groups": [_payload(i, t) for i, t in chunk]})
        e = self.endpoint
        last: Exception | None = None
        for attempt in range(e.retries + 1):
            if attempt:
                await asyncio.sleep(e.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            if not self.breaker.allow():  # fail fast: no call, no wait
                last = _Transient(f"circuit open after {e.breaker_failures} failed calls")
                break
            try:
                return await self._post(client, body, chunk)
            except (aiohttp.ClientError, TimeoutError, _Transient) as exc:
                self.breaker.failure()
                last = exc
        reason = f"{type(last).__name__}: {last}" if last else "no attempt"
        error = RetryableError(f"reward {self.name!r} at {e.url} failed after "
                               f"{e.retries + 1} attempt(s): {reason}")
        return [error] * len(chunk)

    async def _post(self, client: _Client, body: bytes, chunk: Sequence[Group]) -> list[Result]:
        async with client.slots:
            self.calls += 1
            async with client.session.post(self.endpoint.url, data=body,
                                           headers={"Content-Type": "application/json"}) as resp:
                if resp.status in (400, 422):
                    self.breaker.success()  # the judge is up; it refused these groups
                    text = (await resp.text())[:500]
                    error = PoisonEventError(f"reward {self.name!r} refused the group "
                                             f"({resp.status}): {text}")
                    return [error] * len(chunk)
                if resp.status != 200:
                    raise _Transient(f"HTTP {resp.status}")
                raw = await resp.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Transient(f"answer is not JSON: {exc}") from exc
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list) or len(scores) != len(chunk):
            raise _Transient(f"answer has no 'scores' list of {len(chunk)} groups")
        self.breaker.success()
        return [self._group_scores(s, len(texts)) for s, (_, texts) in
                zip(scores, chunk, strict=True)]

    def _group_scores(self, scores: Any, n: int) -> Result:
        if isinstance(scores, list) and len(scores) == n and all(
                type(x) is float or type(x) is int for x in scores):  # no bools, no strings
            out = [float(x) for x in scores]
            if math.isfinite(sum(out)):
                return out
            return RetryableError(f"reward {self.name!r} answered a non-finite score")
        return RetryableError(f"reward {self.name!r} answered {scores!r:.200} for a group of "
                              f"{n} completions")


def _payload(interaction: InteractionLogged, texts: Sequence[str]) -> dict[str, Any]:
    return {"interaction_id": interaction.event_id, "policy_id": interaction.policy_id,
            "prompt": interaction.prompt, "completions": list(texts),
            "reference": interaction.reference, "response": interaction.response,
            "feedback": interaction.feedback, "task_params": interaction.task_params}
