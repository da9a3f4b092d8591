"""A stage's outputs on their way to the broker, and the seen-marks that must wait for them.

An input is marked handled only after the outputs it produced are on the broker: a crash in
between redelivers the input, and the outputs are re-sent under the same derived ids, which the
next stage drops. A unit with outputs is marked at once (a redelivery must not redo its work);
a unit without outputs, or a stage that confirms per batch, defers its marks to one Redis round
trip at the end of the batch (or after `MARK_FLUSH_S`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import faust
from pydantic import BaseModel

from schemas.codec import encode_event
from streams.ops import metrics
from workers.pipeline import faults
from workers.pipeline.state import PolicyState

MARK_FLUSH_S = 1.0
"""Deferred seen-marks wait at most this long (a crash redoes at most that)."""


@dataclass
class Outbox:
    stage: str
    state: PolicyState
    _sending: list[tuple[Awaitable[Any], BaseModel]] = field(default_factory=list)
    _deferred: list[str] = field(default_factory=list)
    _deferred_since: float = 0.0

    async def send(self, sink: faust.TopicT, outputs: list[BaseModel], default_key: str, *,
                   wait: bool) -> None:
        """Send every output, keyed by its policy; with `wait`, return once the broker has them
        all (they travel together), else leave that to the next flush."""
        for out in outputs:
            key = getattr(out, "policy_id", None) or default_key
            fut = await sink.send(key=key.encode(), value=encode_event(out), force=True)
            self._sending.append((fut, out))
        if wait:
            await self.confirm()

    async def confirm(self) -> None:
        sending, self._sending = self._sending, []
        for fut, out in sending:
            await fut
            metrics.record_output(out)

    def mark(self, event_ids: list[str], *, now: bool) -> None:
        """Mark events handled: at once, or with the batch's other deferred marks."""
        if not event_ids:
            return
        faults.hit(f"{self.stage}:before_mark_seen")
        if now:
            self.state.mark_seen_many(self.stage, event_ids)
            return
        if not self._deferred:
            self._deferred_since = time.monotonic()
        self._deferred.extend(event_ids)

    async def flush_if_due(self) -> None:
        if self._deferred and time.monotonic() - self._deferred_since > MARK_FLUSH_S:
            await self.flush()

    async def flush(self) -> None:
        """Marks go after the outputs they stand for are on the broker, never before."""
        await self.confirm()
        if self._deferred:
            ids, self._deferred = self._deferred, []
            self.state.mark_seen_many(self.stage, ids)

    def clear(self) -> None:
        """Forget what a failed batch left: unflushed marks only cost a redo (every effect is
        idempotent), and unconfirmed sends are retried by the redelivery."""
        self._deferred.clear()
        self._sending.clear()
