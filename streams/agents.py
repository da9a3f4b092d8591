"""The one agent body every stage shares: decode, dedup, call the stage function, send.

Whatever goes wrong with one event (bad bytes, schema violation, unknown policy, a bug) ends in
the dead-letter topic with the stage, the reason and the original bytes; the stream goes on.
Transient failures are retried a few times first.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import faust
from pydantic import BaseModel

from schemas.codec import decode_event, encode_event
from schemas.events import (
    AdapterEvaluated,
    AdapterExported,
    DeadLetter,
    Event,
    InteractionLogged,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
)
from streams import metrics
from workers import stages
from workers.context import StageContext
from workers.errors import PoisonEventError, PolicyFailures, RetryableError

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0)
BATCH_WINDOW_S = 0.2
BATCH_POLICIES = 8
"""A batched stage takes up to `update_batch` events for each of this many policies at once
(the update stage trains them all in one multi-policy step)."""
MAX_IN_FLIGHT_WAIT_S = 60.0

StageFn = Callable[[StageContext, Any], list[BaseModel]]


@dataclass(frozen=True)
class StageSpec:
    """A stage: where it reads, what it reads, what it does, where it writes.

    A `batched` stage's function takes a list of events of several policies, at most
    `update_batch` per policy (the update stage trains every ready group of all of them in one
    multi-policy step) and may raise `PolicyFailures` to fail only some policies; the others
    take one event.
    """

    name: str
    source: str
    model: type[Event]
    fn: StageFn
    sink: str
    batched: bool = False


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("rollout", "interactions", InteractionLogged, stages.rollout, "rollouts"),
        StageSpec("reward", "rollouts", RolloutGenerated, stages.reward, "rewards"),
        StageSpec("update", "rewards", RolloutRewarded, stages.update, "updates", batched=True),
        StageSpec("export", "updates", PolicyUpdated, stages.export, "exports"),
        StageSpec("evaluate", "exports", AdapterExported, stages.evaluate, "evaluations"),
        StageSpec("promote", "evaluations", AdapterEvaluated, stages.promote, "promotions"),
    )
}


@dataclass(frozen=True)
class Received:
    """A raw record as it came off Kafka, with where it came from (for dead letters)."""

    raw: bytes | None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    @classmethod
    def of(cls, event: faust.EventT) -> Received:
        msg = event.message
        return cls(msg.value, msg.topic, msg.partition, msg.offset)


Decoded = tuple[Received, Event]


@dataclass
class StageRunner:
    """Runs one stage's agent; kept as an object so tests can drive `process` directly."""

    spec: StageSpec
    ctx: StageContext
    sink: faust.TopicT
    dead_letters: faust.TopicT
    executor: Executor | None = None

    async def run(self, stream: faust.StreamT) -> AsyncIterator[None]:
        if not self.spec.batched:
            async for event in stream.events():
                await self.process_many([Received.of(event)])
                yield None
            return
        # Events are acked only after the batch is handled: at-least-once is kept.
        limit = self.ctx.settings.update_batch * BATCH_POLICIES
        async for events in stream.take_events(limit, within=BATCH_WINDOW_S):
            await self.process_many([Received.of(e) for e in events])
            yield None

    async def process(self, raw: bytes | None, *, topic: str | None = None,
                      partition: int | None = None, offset: int | None = None) -> list[BaseModel]:
        """Handle one raw value; returns what was sent downstream (empty on dead letter)."""
        return await self.process_many([Received(raw, topic, partition, offset)])

    async def process_many(self, items: list[Received]) -> list[BaseModel]:
        """Decode, drop what was handled before, then handle each unit of work in order."""
        fresh: list[Decoded] = []
        for item in items:
            try:
                event = decode_event(self.spec.model, item.raw)
            except PoisonEventError as exc:
                await self._dead_letter(item, exc, None)
                continue
            if await self._call(self.ctx.state.seen, self.spec.name, event.event_id):
                metrics.EVENTS.labels(stage=self.spec.name, outcome="duplicate").inc()
                continue
            fresh.append((item, event))
            self.ctx.note_source(event.event_id, item.topic, item.partition, item.offset)
        sent: list[BaseModel] = []
        try:
            for unit in self._units(fresh):
                sent += await self._handle(unit)
        finally:
            self.ctx.forget_sources(e.event_id for _, e in fresh)
        return sent

    def _units(self, fresh: list[Decoded]) -> list[list[Decoded]]:
        """One event per unit, or (batched) up to `update_batch` events of EACH policy per unit;
        a policy's later events go to later units, so its groups keep their order."""
        if not self.spec.batched:
            return [[d] for d in fresh]
        by_policy: dict[str, list[Decoded]] = {}
        for d in fresh:
            by_policy.setdefault(d[1].policy_id, []).append(d)
        size = self.ctx.settings.update_batch
        rounds = max((len(ds) + size - 1) // size for ds in by_policy.values()) if fresh else 0
        return [[d for ds in by_policy.values() for d in ds[k * size:(k + 1) * size]]
                for k in range(rounds)]

    async def _handle(self, unit: list[Decoded]) -> list[BaseModel]:
        name = self.spec.name
        started = time.perf_counter()
        events = [e for _, e in unit]
        failed: dict[str, Exception] = {}
        try:
            outputs = await self._with_retries(events)
        except PolicyFailures as exc:  # a batched step failed for some policies only
            outputs = [o for o in exc.outputs if isinstance(o, BaseModel)]
            failed = exc.failures
        except Exception as exc:  # one bad event must never stop the stream
            for item, event in unit:
                await self._dead_letter(item, exc, event.policy_id)
            return []
        finally:
            if name == "update":  # consumed, trained or not: the in-flight slots are free
                for event in events:
                    await self._call(self.ctx.state.note_trained, event.policy_id)
        for item, event in unit:
            if event.policy_id in failed:
                await self._dead_letter(item, failed[event.policy_id], event.policy_id)
        events = [e for e in events if e.policy_id not in failed]
        for out in outputs:
            key = getattr(out, "policy_id", None) or unit[0][1].policy_id
            fut = await self.sink.send(key=key.encode(), value=encode_event(out), force=True)
            await fut
            metrics.record_output(out)
        for event in events:
            await self._call(self.ctx.state.mark_seen, name, event.event_id)
        metrics.EVENTS.labels(stage=name, outcome="ok").inc(len(events))
        metrics.LATENCY.labels(stage=name).observe(time.perf_counter() - started)
        return outputs

    async def _with_retries(self, events: list[Event]) -> list[BaseModel]:
        first = events[0]
        throttled = isinstance(first, InteractionLogged) and first.split == "train"
        if throttled:
            await self._wait_for_trainer(first.policy_id)
        arg: Any = events if self.spec.batched else first
        try:
            for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
                try:
                    return await self._call(self.spec.fn, self.ctx, arg)
                except RetryableError:
                    if delay is None:
                        raise
                    log.warning("%s: retryable failure on %s (attempt %d); retrying in %.1fs",
                                self.spec.name, first.event_id, attempt + 1, delay)
                    await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        except BaseException:
            if throttled:  # nothing was sampled: give the slot back
                await self._call(self.ctx.state.note_trained, first.policy_id)
            raise

    async def _wait_for_trainer(self, policy_id: str) -> None:
        """Bound off-policy staleness: don't sample far ahead of what the trainer consumed."""
        limit = self.ctx.settings.max_in_flight
        deadline = time.monotonic() + MAX_IN_FLIGHT_WAIT_S
        while time.monotonic() < deadline:
            if await self._call(self.ctx.state.in_flight, policy_id) < limit:
                break
            await asyncio.sleep(0.05)
        await self._call(self.ctx.state.note_sampled, policy_id)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _dead_letter(self, item: Received, exc: BaseException,
                           policy_id: str | None) -> None:
        stage = self.spec.name
        log.warning("%s: dead-lettering event at %s[%s]@%s: %s", stage, item.topic,
                    item.partition, item.offset, exc)
        letter = DeadLetter(
            policy_id=policy_id,
            stage=stage,
            error_type=type(exc).__name__,
            error=str(exc)[:2000],
            retryable=isinstance(exc, RetryableError),
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
            original_b64=base64.b64encode(item.raw or b"").decode(),
        )
        key = policy_id.encode() if policy_id else None
        fut = await self.dead_letters.send(key=key, value=encode_event(letter), force=True)
        await fut
        metrics.EVENTS.labels(stage=stage, outcome="dead_letter").inc()
        if policy_id and stage == "reward":
            # The trainer will never see this group: release its in-flight slot.
            await self._call(self.ctx.state.note_trained, policy_id)
