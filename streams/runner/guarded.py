"""The stage runner with the pipeline's guards and crash points wired around the shared body.

`StageRunner` (streams/runner/runner.py) is the one agent body: decode, dedup, call, send,
dead-letter. This subclass adds, at its seams and without changing it:

- admission before a stage function runs (`workers.pipeline.guards.refusals`, looked up once per
batch:
  paused or unknown policies are dead-lettered; in a batched unit only the refused policies'
  events are);
- pausing a policy whose training step was rejected, announced once with `PolicyPaused` on
  `promotions`;
- online-reward tracking of what the reward stage scored (automatic rollback);
- the test-only crash points of `workers.pipeline.faults`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

import faust
from pydantic import BaseModel

from schemas.codec import encode_event
from schemas.errors import PoisonEventError, TrainingRejected
from schemas.events import Event
from streams.ops import metrics
from streams.runner.runner import Decoded, Received, StageRunner
from workers.pipeline import faults, guards

log = logging.getLogger(__name__)
EXIT_UNHANDLED = 75  # EX_TEMPFAIL: a supervisor restarts the worker
ADMISSION_TTL_S = 1.0


@dataclass
class GuardedStageRunner(StageRunner):
    """A `StageRunner` that also enforces the guards; `control` is where `PolicyPaused` goes."""

    control: faust.TopicT | None = None
    _admission: dict[str, PoisonEventError | None] = field(default_factory=dict, init=False,
                                                           repr=False)
    _admission_at: float = field(default=0.0, init=False, repr=False)

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
        watching = self.ctx.settings.online_rollback_threshold is not None
        if self.spec.name == "reward" and outputs and watching:
            try:
                await self._call(guards.observe_rewards, self.ctx, outputs)
            except Exception:  # a failed rollback must not stop the reward stream
                log.exception("online-reward rollback check failed")
        return outputs

    async def _prepare(self, fresh: list[Decoded]) -> None:
        """Look up the whole batch's admission in one round trip."""
        self._admission.clear()
        await self._refresh_admission(list(dict.fromkeys(e.policy_id for _, e in fresh)))

    async def _refresh_admission(self, policies: list[str]) -> None:
        if policies:
            refused = self._io(guards.refusals, self.ctx, self.spec.name, policies)
            self._admission.update(refused)
            self._admission_at = time.monotonic()

    async def _admit(self, unit: list[Decoded]) -> list[Decoded]:
        """Dead-letter the events of refused policies; return the rest, in order. Admission is
        looked up per batch and refreshed when older than `ADMISSION_TTL_S`, so a pause set by
        another process during a long batch still stops it."""
        policies = list(dict.fromkeys(e.policy_id for _, e in unit))
        if time.monotonic() - self._admission_at > ADMISSION_TTL_S:  # all of it, at once
            await self._refresh_admission(list(dict.fromkeys([*self._admission, *policies])))
        else:
            await self._refresh_admission([p for p in policies if p not in self._admission])
        admitted: list[Decoded] = []
        for item, event in unit:
            error = self._admission[event.policy_id]
            if error is None and self.spec.name in guards.EVENT_CHECKED_STAGES:
                try:
                    await self._call(guards.admit_event, self.ctx, self.spec.name, event)
                except PoisonEventError as exc:
                    error = exc
            if error is None:
                admitted.append((item, event))
                continue
            await self._dead_letter(item, error, event.policy_id)
            if self.spec.name == "update":  # consumed: its in-flight slot is free
                await self._call(self.ctx.state.note_trained, event.policy_id)
        return admitted

    async def _with_retries(self, events: list[Event]) -> list[BaseModel]:
        outputs = await super()._with_retries(events)
        faults.hit(f"{self.spec.name}:after_fn")
        return outputs

    def _before_mark(self) -> None:
        faults.hit(f"{self.spec.name}:before_mark_seen")

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
            self._admission.pop(policy_id, None)  # its next event sees the pause
