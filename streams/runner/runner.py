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
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import faust
from pydantic import BaseModel

from schemas.codec import decode_event, encode_event
from schemas.errors import EventFailures, PoisonEventError, PolicyFailures, RetryableError
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
from streams.ops import metrics
from workers.pipeline import stages
from workers.pipeline import units as rollout_units
from workers.pipeline.context import StageContext

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0)
BATCH_WINDOW_S = 0.2
BATCH_POLICIES = 8
"""A batched stage takes up to `update_batch` events for each of this many policies at once
(the update stage trains them all in one multi-policy step)."""
STREAM_WINDOW_S = 0.05
"""How long an unbatched stage waits to fill a batch (up to `stream_batch` events)."""
MARK_FLUSH_S = 1.0
"""Seen-marks of units without outputs wait at most this long (a crash redoes at most that)."""

StageFn = Callable[[StageContext, Any], list[BaseModel]]
BulkFn = Callable[[StageContext, list[Any]], list[str]]


@dataclass(frozen=True)
class StageSpec:
    """A stage: where it reads, what it reads, what it does, where it writes.

    A `batched` stage's function takes a list of events of several policies, at most
    `update_batch` per policy (the update stage trains every ready group of all of them in one
    multi-policy step) and may raise `PolicyFailures` to fail only some policies; the others
    take one event. A `bulk` function takes a whole batch first and returns the ids it handled
    completely (no outputs); the rest go through `fn`. A `pipelined` stage does not wait for
    the broker after each unit: its outputs are confirmed together, then its inputs marked, at
    the end of the batch (or after `MARK_FLUSH_S`); for a cheap pure stage a crash only re-sends
    outputs under the same derived ids, and the next stage drops them. An `inline` stage's
    function is called on the event loop, not in the model thread: for microseconds of pure
    Python the thread hand-off costs more than the work, and it must not queue behind a model.
    A `sampling` stage's function takes a unit of interactions of several policies and samples
    them all in one engine call (rows of different adapters share its forwards); units are
    formed within each policy's in-flight room (workers/pipeline/units.py), each training
    interaction holds a slot until the trainer consumes its group, and the function may raise
    `EventFailures` to fail only some events.
    """

    name: str
    source: str
    model: type[Event]
    fn: StageFn
    sink: str
    batched: bool = False
    bulk: BulkFn | None = None
    pipelined: bool = False
    inline: bool = False
    sampling: bool = False


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("rollout", "interactions", InteractionLogged, stages.rollout_many, "rollouts",
                  bulk=stages.store_heldout, sampling=True),
        StageSpec("reward", "rollouts", RolloutGenerated, stages.reward, "rewards",
                  pipelined=True, inline=True),
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
    """Runs one stage's agent; kept as an object so tests can drive `process` directly.

    The stream is taken in batches so the per-event Redis work (seen-checks, seen-marks) costs
    one round trip per batch, not per event; units of work (one event, a batched stage's
    policies' groups, or a sampling stage's interactions) are still handled one at a time.
    """

    spec: StageSpec
    ctx: StageContext
    sink: faust.TopicT
    dead_letters: faust.TopicT
    executor: Executor | None = None
    _deferred: list[str] = field(default_factory=list, init=False, repr=False)
    _deferred_since: float = field(default=0.0, init=False, repr=False)
    _sending: list[tuple[Awaitable[Any], BaseModel]] = field(default_factory=list, init=False,
                                                              repr=False)

    async def run(self, stream: faust.StreamT) -> AsyncIterator[None]:
        settings = self.ctx.settings
        if self.spec.batched:
            limit, within = settings.update_batch * BATCH_POLICIES, BATCH_WINDOW_S
        else:
            limit, within = settings.stream_batch, STREAM_WINDOW_S
        # Events are acked only after their batch is handled: at-least-once is kept.
        # `take_events` is on faust-streaming's Stream, not on its StreamT protocol.
        async for events in stream.take_events(limit, within=within):  # type: ignore[attr-defined]
            await self.process_many([Received.of(e) for e in events])
            yield None

    async def process(self, raw: bytes | None, *, topic: str | None = None,
                      partition: int | None = None, offset: int | None = None) -> list[BaseModel]:
        """Handle one raw value; returns what was sent downstream (empty on dead letter)."""
        return await self.process_many([Received(raw, topic, partition, offset)])

    async def process_many(self, items: list[Received]) -> list[BaseModel]:
        """Decode, drop what was handled before, then handle each unit of work in order."""
        fresh = await self._fresh(items)
        sent: list[BaseModel] = []
        try:
            await self._prepare(fresh)
            async for unit in self._schedule(self._units(await self._bulk(fresh))):
                sent += await self._handle(unit)
                if self._deferred and time.monotonic() - self._deferred_since > MARK_FLUSH_S:
                    await self._flush_marks()
            await self._flush_marks()
        finally:
            self._deferred.clear()  # unflushed marks only cost a redo: every effect is idempotent
            self._sending.clear()
            self.ctx.forget_sources(e.event_id for _, e in fresh)
        return sent

    async def _fresh(self, items: list[Received]) -> list[Decoded]:
        """Decode (dead-lettering what does not decode) and drop events already handled."""
        decoded: list[Decoded] = []
        for item in items:
            try:
                decoded.append((item, decode_event(self.spec.model, item.raw)))
            except PoisonEventError as exc:
                await self._dead_letter(item, exc, None)
        if not decoded:
            return []
        ids = [event.event_id for _, event in decoded]
        seen = self._io(self.ctx.state.seen_many, self.spec.name, ids)
        fresh: list[Decoded] = []
        for (item, event), was_seen in zip(decoded, seen, strict=True):
            if was_seen:
                metrics.EVENTS.labels(stage=self.spec.name, outcome="duplicate").inc()
                continue
            fresh.append((item, event))
            self.ctx.note_source(event.event_id, item.topic, item.partition, item.offset)
        return fresh

    async def _prepare(self, fresh: list[Decoded]) -> None:
        """Hook: per-batch work before any unit is handled (the guards prefetch admission)."""

    async def _admit(self, unit: list[Decoded]) -> list[Decoded]:
        """Hook: the events of `unit` this stage may handle (the guards refuse some)."""
        return unit

    async def _bulk(self, fresh: list[Decoded]) -> list[Decoded]:
        """Give what the stage's bulk function takes to it in one call; return the rest."""
        if self.spec.bulk is None or not fresh:
            return fresh
        admitted = await self._admit(fresh)
        if not admitted:
            return []
        handled = set(self._io(self.spec.bulk, self.ctx, [e for _, e in admitted]))
        if handled:
            await self._mark(sorted(handled), now=False)
            metrics.EVENTS.labels(stage=self.spec.name, outcome="ok").inc(len(handled))
        return [d for d in admitted if d[1].event_id not in handled]

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

    async def _schedule(self, units: list[list[Decoded]]) -> AsyncIterator[list[Decoded]]:
        """The units in the order they are handled. A sampling stage's one-event units are
        regrouped as it goes: each unit is formed once the one before it has been handled,
        within the in-flight room of its policies at that moment."""
        if not self.spec.sampling:
            for unit in units:
                yield unit
            return
        s, state = self.ctx.settings, self.ctx.state
        async for unit in rollout_units.units(
                [d for u in units for d in u], capacity=rollout_units.unit_capacity(s.group_size),
                limit=s.max_in_flight, in_flight=lambda ps: self._io(state.in_flight_many, ps)):
            yield unit

    async def _handle(self, unit: list[Decoded]) -> list[BaseModel]:
        name = self.spec.name
        started = time.perf_counter()
        events = [e for _, e in unit]
        failed: dict[str, Exception] = {}  # by event id
        try:
            outputs = await self._with_retries(events)
        except (PolicyFailures, EventFailures) as exc:  # a batched call failed for some only
            outputs = [o for o in exc.outputs if isinstance(o, BaseModel)]
            failed = _failed_events(events, exc)
        except Exception as exc:  # one bad event must never stop the stream
            for item, event in unit:
                await self._dead_letter(item, exc, event.policy_id)
            return []
        finally:
            if name == "update":  # consumed, trained or not: the in-flight slots are free
                for event in events:
                    await self._call(self.ctx.state.note_trained, event.policy_id)
        for item, event in unit:
            if event.event_id in failed:
                await self._dead_letter(item, failed[event.event_id], event.policy_id)
        events = [e for e in events if e.event_id not in failed]
        pipelined = self.spec.pipelined
        await self._send(outputs, unit[0][1].policy_id, wait=not pipelined)
        await self._mark([e.event_id for e in events], now=bool(outputs) and not pipelined)
        metrics.EVENTS.labels(stage=name, outcome="ok").inc(len(events))
        metrics.LATENCY.labels(stage=name).observe(time.perf_counter() - started)
        return outputs

    async def _send(self, outputs: list[BaseModel], default_key: str, *, wait: bool) -> None:
        """Send every output; with `wait`, return once the broker has them all (they travel
        together), else leave that to the flush before the inputs are marked."""
        for out in outputs:
            key = getattr(out, "policy_id", None) or default_key
            fut = await self.sink.send(key=key.encode(), value=encode_event(out), force=True)
            self._sending.append((fut, out))
        if wait:
            await self._confirm_sends()

    async def _confirm_sends(self) -> None:
        sending, self._sending = self._sending, []
        for fut, out in sending:
            await fut
            metrics.record_output(out)

    def _before_mark(self) -> None:
        """Hook: the crash window between "outputs sent" and "input marked handled"."""

    async def _mark(self, event_ids: list[str], *, now: bool) -> None:
        """Mark events handled: at once when they produced outputs (a redelivery must not redo
        that work), else at the end of the batch, all in one round trip."""
        if not event_ids:
            return
        self._before_mark()
        if now:
            self._io(self.ctx.state.mark_seen_many, self.spec.name, event_ids)
            return
        if not self._deferred:
            self._deferred_since = time.monotonic()
        self._deferred.extend(event_ids)

    async def _flush_marks(self) -> None:
        """Marks go after the outputs they stand for are on the broker, never before."""
        await self._confirm_sends()
        if self._deferred:
            ids, self._deferred = self._deferred, []
            self._io(self.ctx.state.mark_seen_many, self.spec.name, ids)

    async def _with_retries(self, events: list[Event]) -> list[BaseModel]:
        first = events[0]
        sampling = self.spec.sampling
        # A training interaction holds an in-flight slot until the trainer consumes its group.
        held = [e for e in events if sampling and rollout_units.throttled(e)]
        for event in held:
            self._io(self.ctx.state.note_sampled, event.policy_id)
        arg: Any = events if self.spec.batched or sampling else first
        try:
            for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
                try:
                    if self.spec.inline:
                        return self.spec.fn(self.ctx, arg)
                    return await self._call(self.spec.fn, self.ctx, arg)
                except RetryableError:
                    if delay is None:
                        raise
                    log.warning("%s: retryable failure on %s (attempt %d); retrying in %.1fs",
                                self.spec.name, first.event_id, attempt + 1, delay)
                    await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        except BaseException as exc:  # give back the slots of what was not sampled
            unsampled = exc.failures if isinstance(exc, EventFailures) else None
            for event in held:
                if unsampled is None or event.event_id in unsampled:
                    self._io(self.ctx.state.note_trained, event.policy_id)
            raise

    @staticmethod
    def _io(fn: Callable[..., Any], *args: Any) -> Any:
        """A batch's Redis round trip, on the event loop: a millisecond or two for a whole
        batch, cheaper than a thread hand-off, and never queued behind a model step running
        in the executor."""
        return fn(*args)

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


def _failed_events(events: list[Event], exc: PolicyFailures | EventFailures
                   ) -> dict[str, Exception]:
    """Which events of a unit failed, by event id, and with which error."""
    if isinstance(exc, EventFailures):
        return dict(exc.failures)
    return {e.event_id: exc.failures[e.policy_id] for e in events if e.policy_id in exc.failures}
