"""The stage runner: the one Faust agent body every stage shares.

A batch off the stream goes, top to bottom: decode → admit → bulk → drop seen → form units →
call the stage → send → mark. What differs between stages is said by the stage
(`workers.pipeline.stage.Stage`: its unit policy, admission, in-flight ledger, delivery); this
module never asks which stage it runs.

Whatever goes wrong with one event (bad bytes, schema violation, a refused policy, a bug) ends
in the dead-letter topic with the stage, the reason and the original bytes; the stream goes on.
Transient failures are retried a few times first. Anything that is not the event's fault (an
output that cannot be sent, Redis down) makes the process exit at once: Faust would otherwise
ack and commit the event it was on.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import faust
from pydantic import BaseModel

from schemas.codec import Origin, decode_event, encode_event
from schemas.errors import (
    EventFailures,
    PoisonEventError,
    PolicyFailures,
    RetryableError,
    TrainingRejected,
)
from schemas.events import DeadLetter, Event
from streams.ops import metrics
from streams.runner.admission import AdmissionCache
from streams.runner.origin import first_read_at
from streams.runner.outbox import Outbox
from workers.pipeline import faults, guards
from workers.pipeline.context import StageContext
from workers.pipeline.stage import Delivery, Stage

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0)
EXIT_UNHANDLED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


class Received(NamedTuple):
    """A raw record as it came off Kafka, with where it came from (for dead letters) and, for
    a re-sent record, where it was first read (its id derives from that, `schemas/ids.py`).
    A named tuple: one is made per event, at under half a frozen dataclass's cost."""

    raw: bytes | None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    first_read: Origin | None = None

    @classmethod
    def of(cls, event: faust.EventT) -> Received:
        msg = event.message
        return cls(msg.value, msg.topic, msg.partition, msg.offset, first_read_at(msg.headers))

    @property
    def origin(self) -> Origin | None:
        if self.first_read is not None:
            return self.first_read
        if self.topic is None or self.partition is None or self.offset is None:
            return None
        return self.topic, self.partition, self.offset


Decoded = tuple[Received, Event]
Refused = tuple[Received, Event, PoisonEventError]
"""An event its policy may not enter now, with the reason (paused, unregistered)."""
Failed = dict[str, BaseException]
"""Why each event of a unit failed, by event id."""


@dataclass
class StageRunner:
    """Runs one stage's agent; an object, so tests can drive `process_many` directly.

    `control` is where a `PolicyPaused` announcement goes (the `promotions` topic).
    """

    stage: Stage[Any]
    ctx: StageContext
    sink: faust.TopicT
    dead_letters: faust.TopicT
    executor: Executor | None = None
    control: faust.TopicT | None = None
    admission: AdmissionCache = field(init=False)
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.admission = AdmissionCache(self.stage.admission, self.ctx)
        self.outbox = Outbox(self.stage.name, self.ctx.state)

    async def run(self, stream: faust.StreamT) -> AsyncIterator[None]:
        """The agent: events are acked only after their batch is handled (at-least-once).
        `take_events` is on faust-streaming's Stream, not on its StreamT protocol."""
        limit, within = self.stage.units.take(self.ctx.settings)
        async for events in stream.take_events(limit, within=within):  # type: ignore[attr-defined]
            await self.process_many([Received.of(e) for e in events])
            yield None

    async def process_many(self, items: list[Received]) -> list[BaseModel]:
        """Handle a batch; returns what was sent downstream. Crash-only on anything unhandled,
        so the batch stays uncommitted and is redelivered to the restarted worker, where the
        seen-marks drop what was already done."""
        try:
            return await self._process(items)
        except (Exception, asyncio.CancelledError) as exc:
            log.critical("%s: unhandled %s while handling %d event(s); exiting so nothing is "
                         "acked: %s", self.stage.name, type(exc).__name__, len(items), exc)
            logging.shutdown()
            os._exit(EXIT_UNHANDLED)

    async def _process(self, items: list[Received]) -> list[BaseModel]:
        decoded = await self._decode(items)
        self.admission.start_batch(list(dict.fromkeys(e.policy_id for _, e in decoded)))
        sent: list[BaseModel] = []
        fresh: list[Decoded] = []
        try:
            admitted, refused = self._split(decoded)
            rest = await self._bulk(admitted)
            seen = self._seen([e.event_id for _, e in rest] + [e.event_id for _, e, _ in refused])
            await self._refuse([r for r in refused if r[1].event_id not in seen])
            fresh = [d for d in rest if d[1].event_id not in seen]
            for item, event in fresh:
                self.ctx.note_source(event.event_id, item.topic, item.partition, item.offset)
            async for unit in self.stage.units.units(self.ctx, fresh):
                sent += await self._handle(unit)
                await self.outbox.flush_if_due()
            await self.outbox.flush()
        finally:
            self.outbox.clear()
            self.ctx.forget_sources(e.event_id for _, e in fresh)
        return sent

    async def _decode(self, items: list[Received]) -> list[Decoded]:
        """Decode (dead-lettering what does not decode) and drop copies of one event within
        the batch (a producer that crashed after sending, before marking, sends it again:
        without this it would be trained twice under one id)."""
        decoded: dict[str, Decoded] = {}
        copies, model = 0, self.stage.event
        for item in items:
            try:
                event = decode_event(model, item.raw, item.origin)
            except PoisonEventError as exc:
                await self._dead_letter(item, exc, None)
                continue
            copies += event.event_id in decoded
            decoded.setdefault(event.event_id, (item, event))
        self._count("duplicate", copies)
        return list(decoded.values())

    def _seen(self, ids: list[str]) -> set[str]:
        """Which of `ids` were handled before (one read for the batch). Asked after the bulk
        path, which writes no marks, and before refusals are dead-lettered, so an event handled
        before its policy was paused is dropped as a copy rather than dead-lettered."""
        seen = {i for i, was in zip(ids, self.ctx.state.seen_many(self.stage.name, ids),
                                    strict=True) if was}
        self._count("duplicate", len(seen))
        return seen

    async def _admit(self, unit: list[Decoded]) -> list[Decoded]:
        """Dead-letter the events of refused policies; return the rest, in order."""
        admitted, refused = self._split(unit)
        await self._refuse(refused)
        return admitted

    def _split(self, unit: list[Decoded]) -> tuple[list[Decoded], list[Refused]]:
        """The admitted events and the refused ones with their policy's reason, in order."""
        refusals = self.admission.refusals(list(dict.fromkeys(e.policy_id for _, e in unit)))
        admitted: list[Decoded] = []
        refused: list[Refused] = []
        for item, event in unit:
            error = refusals[event.policy_id]
            if error is None:
                admitted.append((item, event))
            else:
                refused.append((item, event, error))
        return admitted, refused

    async def _refuse(self, refused: list[Refused]) -> None:
        """Dead-letter refused events; free their in-flight slots."""
        for item, event, error in refused:
            await self._dead_letter(item, error, event.policy_id)
        if refused:
            self.stage.slots.refused(self.ctx, [event for _, event, _ in refused])

    async def _bulk(self, admitted: list[Decoded]) -> list[Decoded]:
        """Give the batch to the stage's bulk path first; return what it left. What it took is
        not marked seen: its writes are keyed by event id, so a redelivery repeats them to no
        effect, and a mark would only add a Redis write and a week-long key per event."""
        if self.stage.bulk is None or not admitted:
            return admitted
        handled = set(self.stage.bulk(self.ctx, [e for _, e in admitted],
                                      [item.raw for item, _ in admitted]))
        self._count("ok", len(handled))
        return [d for d in admitted if d[1].event_id not in handled]

    async def _handle(self, unit: list[Decoded]) -> list[BaseModel]:
        """One call of the stage: admission again (a long batch), the call, its dead letters,
        its outputs, its marks."""
        unit = await self._admit(unit)
        if not unit:
            return []
        started = time.perf_counter()
        events = [e for _, e in unit]
        self.stage.slots.started(self.ctx, events)
        try:
            outputs, failed = await self._call(events)
        except BaseException:
            self.stage.slots.finished(self.ctx, events, {e.event_id for e in events})
            raise
        self.stage.slots.finished(self.ctx, events, failed)
        for item, event in unit:
            if event.event_id in failed:
                await self._dead_letter(item, failed[event.event_id], event.policy_id)
        handled = [e.event_id for e in events if e.event_id not in failed]
        if not handled and not outputs:
            return []
        per_unit = self.stage.delivery is Delivery.PER_UNIT
        await self.outbox.send(self.sink, outputs, events[0].policy_id, wait=per_unit)
        self.outbox.mark(handled, now=bool(outputs) and per_unit)
        self._count("ok", len(handled))
        metrics.LATENCY.labels(stage=self.stage.name).observe(time.perf_counter() - started)
        if outputs and self.stage.observe is not None:
            try:
                await self._invoke(self.stage.observe, self.ctx, outputs)
            except Exception:  # watching must never stop the stream
                log.exception("%s: observing outputs failed", self.stage.name)
        return outputs

    async def _call(self, events: list[Event]) -> tuple[list[BaseModel], Failed]:
        """The stage function on a unit, retried on transient failures; returns its outputs and
        the events that failed (all of them, or those a partial failure names)."""
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            try:
                outputs = await self._invoke(self.stage.handle, self.ctx, events)
            except RetryableError as exc:
                if delay is None:
                    return [], dict.fromkeys([e.event_id for e in events], exc)
                log.warning("%s: retryable failure on %s (attempt %d); retrying in %.1fs",
                            self.stage.name, events[0].event_id, attempt + 1, delay)
                await asyncio.sleep(delay)
                continue
            except (PolicyFailures, EventFailures) as exc:  # some failed: send the others
                return [o for o in exc.outputs if isinstance(o, BaseModel)], _failed(events, exc)
            except Exception as exc:  # one bad unit must never stop the stream
                return [], dict.fromkeys([e.event_id for e in events], exc)
            faults.hit(f"{self.stage.name}:after_fn")
            return outputs, {}
        raise AssertionError("unreachable")

    async def _invoke(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Model work runs in the executor (one model thread per process), so the event loop
        stays free to heartbeat and commit; a stage that is pure microseconds runs inline, and
        a coroutine function is awaited on the loop."""
        if self.executor is None or self.stage.on_loop:
            result = fn(*args)
        else:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        return await result if inspect.isawaitable(result) else result

    async def _dead_letter(self, item: Received, exc: BaseException,
                           policy_id: str | None) -> None:
        stage = self.stage.name
        log.warning("%s: dead-lettering event at %s[%s]@%s: %s", stage, item.topic,
                    item.partition, item.offset, exc)
        letter = DeadLetter(
            policy_id=policy_id, stage=stage, error_type=type(exc).__name__,
            error=str(exc)[:2000], retryable=isinstance(exc, RetryableError),
            topic=item.topic, partition=item.partition, offset=item.offset,
            original_b64=base64.b64encode(item.raw or b"").decode(),
        )
        key = policy_id.encode() if policy_id else None
        await (await self.dead_letters.send(key=key, value=encode_event(letter), force=True))
        self._count("dead_letter", 1)
        if policy_id and isinstance(exc, TrainingRejected):
            await self._pause(policy_id, str(exc))

    async def _pause(self, policy_id: str, reason: str) -> None:
        """A rejected training step pauses its policy; the first pause is announced."""
        paused = guards.pause(self.ctx, policy_id, self.stage.name, reason)
        if paused is not None and self.control is not None:
            await (await self.control.send(key=policy_id.encode(), value=encode_event(paused),
                                           force=True))
        self.admission.forget(policy_id)

    def _count(self, outcome: str, n: int) -> None:
        if n:
            metrics.EVENTS.labels(stage=self.stage.name, outcome=outcome).inc(n)


def _failed(events: Sequence[Event], exc: PolicyFailures | EventFailures) -> Failed:
    """Which events of a unit a partial failure names, with their errors."""
    if isinstance(exc, EventFailures):
        return dict(exc.failures)
    return {e.event_id: exc.failures[e.policy_id] for e in events if e.policy_id in exc.failures}
