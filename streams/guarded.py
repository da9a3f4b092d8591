"""The stage runner with the pipeline's guards and crash points wired around the shared body.

`StageRunner` (streams/agents.py) is the one agent body: decode, dedup, call, send, dead-letter.
This subclass adds, at its seams and without changing it:

- admission before a stage function runs (`workers.guards.admit`: paused or unknown policies
  are dead-lettered; in a batched unit only the refused policies' events are);
- pausing a policy whose training step was rejected, announced once with `PolicyPaused` on
  `promotions`;
- online-reward tracking of what the reward stage scored (automatic rollback);
- the test-only crash points of `workers.faults`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
from pydantic import BaseModel

from schemas.codec import encode_event
from schemas.events import Event
from streams import metrics
from streams.agents import Decoded, Received, StageRunner
from workers import faults, guards
from workers.errors import PoisonEventError, TrainingRejected

log = logging.getLogger(__name__)
EXIT_UNHANDLED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


@dataclass
class GuardedStageRunner(StageRunner):
    """A `StageRunner` that also enforces the guards; `control` is where `PolicyPaused` goes."""

    control: faust.TopicT | None = None

    async def process_many(self, items: list[Received]) -> list[BaseModel]:
        """Crash-only on anything unhandled: Faust acks (and then commits) the event an agent
        was on when it raises or is cancelled, so an output that failed to send (broker down)
        or a Redis outage would lose the input. Exiting at once leaves it uncommitted: it is
        redelivered to the restarted worker, and the seen-marks drop what was already done."""
        try:
            return await super().process_many(items)
        except (Exception, asyncio.CancelledError) as exc:
            log.critical("%s: unhandled %s while handling %d event(s); exiting so nothing is "
                         "acked: %s", self.spec.name, type(exc).__name__, len(items), exc)
            logging.shutdown()
            os._exit(EXIT_UNHANDLED)

    def _units(self, fresh: list[Decoded]) -> list[list[Decoded]]:
        """Drop copies of one event within a batch: seen-marks only see handled units, and a
        copy redelivered next to its original (a producer that crashed after sending, before
        marking) would otherwise be trained twice, under one event id."""
        unique: dict[str, Decoded] = {}
        for item, event in fresh:
            unique.setdefault(event.event_id, (item, event))
        if len(unique) < len(fresh):
            metrics.EVENTS.labels(stage=self.spec.name, outcome="duplicate").inc(
                len(fresh) - len(unique))
        return super()._units(list(unique.values()))

    async def _handle(self, unit: list[Decoded]) -> list[BaseModel]:
        admitted = await self._admit(unit)
        if not admitted:
            return []
        outputs = await super()._handle(admitted)
        if self.spec.name == "reward" and outputs:
            try:
                await self._call(guards.observe_rewards, self.ctx, outputs)
            except Exception:  # a failed rollback must not stop the reward stream
                log.exception("online-reward rollback check failed")
        return outputs

    async def _admit(self, unit: list[Decoded]) -> list[Decoded]:
        """Dead-letter the events of refused policies; return the rest, in order."""
        refused: dict[str, PoisonEventError | None] = {}
        admitted: list[Decoded] = []
        for item, event in unit:
            policy = event.policy_id
            if policy not in refused:
                try:
                    await self._call(guards.admit, self.ctx, self.spec.name, event)
                    refused[policy] = None
                except PoisonEventError as exc:
                    refused[policy] = exc
            error = refused[policy]
            if error is None:
                admitted.append((item, event))
                continue
            await self._dead_letter(item, error, policy)
            if self.spec.name == "update":  # consumed: its in-flight slot is free
                await self._call(self.ctx.state.note_trained, policy)
        return admitted

    async def _with_retries(self, events: list[Event]) -> list[BaseModel]:
        outputs = await super()._with_retries(events)
        faults.hit(f"{self.spec.name}:after_fn")
        return outputs

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn == self.ctx.state.mark_seen:
            faults.hit(f"{self.spec.name}:before_mark_seen")
        return await super()._call(fn, *args)

    async def _dead_letter(self, item: Received, exc: BaseException,
                           policy_id: str | None) -> None:
        await super()._dead_letter(item, exc, policy_id)
        if policy_id and isinstance(exc, TrainingRejected):
            paused = await self._call(guards.pause, self.ctx, policy_id, self.spec.name,
                                      str(exc))
            if paused is not None and self.control is not None:
                fut = await self.control.send(key=policy_id.encode(),
                                              value=encode_event(paused), force=True)
                await fut
