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
from workers.errors import PoisonEventError, RetryableError

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0)
MAX_IN_FLIGHT_WAIT_S = 60.0

StageFn = Callable[[StageContext, Any], list[BaseModel]]


@dataclass(frozen=True)
class StageSpec:
    """A stage: where it reads, what it reads, what it does, where it writes."""

    name: str
    source: str
    model: type[Event]
    fn: StageFn
    sink: str


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("rollout", "interactions", InteractionLogged, stages.rollout, "rollouts"),
        StageSpec("reward", "rollouts", RolloutGenerated, stages.reward, "rewards"),
        StageSpec("update", "rewards", RolloutRewarded, stages.update, "updates"),
        StageSpec("export", "updates", PolicyUpdated, stages.export, "exports"),
        StageSpec("evaluate", "exports", AdapterExported, stages.evaluate, "evaluations"),
        StageSpec("promote", "evaluations", AdapterEvaluated, stages.promote, "promotions"),
    )
}


@dataclass
class StageRunner:
    """Runs one stage's agent; kept as an object so tests can drive `process` directly."""

    spec: StageSpec
    ctx: StageContext
    sink: faust.TopicT
    dead_letters: faust.TopicT
    executor: Executor | None = None

    async def run(self, stream: faust.StreamT) -> AsyncIterator[None]:
        async for event in stream.events():
            msg = event.message
            await self.process(msg.value, topic=msg.topic, partition=msg.partition,
                               offset=msg.offset)
            yield None

    async def process(self, raw: bytes | None, *, topic: str | None = None,
                      partition: int | None = None, offset: int | None = None) -> list[BaseModel]:
        """Handle one raw value; returns what was sent downstream (empty on dead letter)."""
        name = self.spec.name
        started = time.perf_counter()
        try:
            event = decode_event(self.spec.model, raw)
        except PoisonEventError as exc:
            await self._dead_letter(raw, exc, None, topic, partition, offset)
            return []
        if await self._call(self.ctx.state.seen, name, event.event_id):
            metrics.EVENTS.labels(stage=name, outcome="duplicate").inc()
            return []
        try:
            outputs = await self._with_retries(event)
        except Exception as exc:  # one bad event must never stop the stream
            await self._dead_letter(raw, exc, event.policy_id, topic, partition, offset)
            return []
        for out in outputs:
            fut = await self.sink.send(key=event.policy_id.encode(), value=encode_event(out),
                                       force=True)
            await fut
            metrics.record_output(out)
        await self._call(self.ctx.state.mark_seen, name, event.event_id)
        metrics.EVENTS.labels(stage=name, outcome="ok").inc()
        metrics.LATENCY.labels(stage=name).observe(time.perf_counter() - started)
        return outputs

    async def _with_retries(self, event: Event) -> list[BaseModel]:
        throttled = isinstance(event, InteractionLogged) and event.split == "train"
        if throttled:
            await self._wait_for_trainer(event.policy_id)
        try:
            for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
                try:
                    return await self._call(self.spec.fn, self.ctx, event)
                except RetryableError:
                    if delay is None:
                        raise
                    log.warning("%s: retryable failure on %s (attempt %d); retrying in %.1fs",
                                self.spec.name, event.event_id, attempt + 1, delay)
                    await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        except BaseException:
            if throttled:  # nothing was sampled: give the slot back
                await self._call(self.ctx.state.note_trained, event.policy_id)
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

    async def _dead_letter(self, raw: bytes | None, exc: BaseException, policy_id: str | None,
                           topic: str | None, partition: int | None, offset: int | None) -> None:
        stage = self.spec.name
        log.warning("%s: dead-lettering event at %s[%s]@%s: %s", stage, topic, partition,
                    offset, exc)
        letter = DeadLetter(
            policy_id=policy_id,
            stage=stage,
            error_type=type(exc).__name__,
            error=str(exc)[:2000],
            retryable=isinstance(exc, RetryableError),
            topic=topic,
            partition=partition,
            offset=offset,
            original_b64=base64.b64encode(raw or b"").decode(),
        )
        key = policy_id.encode() if policy_id else None
        fut = await self.dead_letters.send(key=key, value=encode_event(letter), force=True)
        await fut
        metrics.EVENTS.labels(stage=stage, outcome="dead_letter").inc()
        if policy_id and stage in ("reward", "update"):
            # The trainer will never see this group: release its in-flight slot.
            await self._call(self.ctx.state.note_trained, policy_id)
