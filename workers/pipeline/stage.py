"""What a pipeline stage is: where it reads and writes, the plain function it calls, and the few
ways stages differ, each said by the stage as an object rather than by a flag in the runner.

The runner (`streams/runner/`) reads a `Stage` and never asks which stage it runs. How stages
differ:

- `units`: how a batch off the stream is cut into calls (one event each; up to `update_batch`
  groups of each of many policies; interactions of many policies within their in-flight room);
- `admission`: which policies may enter now (paused, unregistered);
- `slots`: the in-flight ledger, which bounds how far sampling runs ahead of training;
- `bulk`: a whole-batch fast path taken before units are formed (held-out prompts are stored);
- `delivery`: whether a unit's outputs must be on the broker before the next unit starts;
- `on_loop`: a pure function of microseconds, or a coroutine function that never blocks (the
  reward stage), runs on the event loop, not the model thread;
- `observe`: what is done with outputs once they are sent (online rollback watches rewards);
- `on_assigned`: what the stage does when a rebalance gives this worker its partitions of the
  input topic (the update stage drops the policies it no longer owns).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from schemas.events import Event
from workers.pipeline.context import StageContext
from workers.pipeline.guards import Admission
from workers.pipeline.inflight import NO_SLOTS, SlotLedger
from workers.pipeline.units import ONE_BY_ONE, UnitPolicy

E = TypeVar("E", bound=Event)

Handler = Callable[[StageContext, list[Any]], list[BaseModel] | Awaitable[list[BaseModel]]]
"""A unit of input events in, output events out (or a coroutine giving them). It may raise
`PolicyFailures` or `EventFailures` (schemas/errors.py) when only part of the unit failed."""


class Delivery(Enum):
    """When a unit's outputs must be confirmed by the broker."""

    PER_UNIT = "unit"
    """Before the next unit starts, and its inputs are marked handled at once: a redelivery
    must not redo expensive work (training, export, evaluation)."""
    PER_BATCH = "batch"
    """Together at the end of the batch, then the inputs are marked: for a cheap pure stage a
    crash only re-sends outputs under the same derived ids, which the next stage drops."""


def single(fn: Callable[[StageContext, E], list[BaseModel]]) -> Handler:
    """A handler for a stage whose function takes one event (its units are single events)."""

    def handle(ctx: StageContext, unit: list[Any]) -> list[BaseModel]:
        (event,) = unit
        return fn(ctx, event)

    handle.__name__ = handle.__qualname__ = fn.__name__
    return handle


@dataclass(frozen=True)
class Stage(Generic[E]):
    """One stream processor of the pipeline, as the runner needs to know it."""

    name: str
    reads: str
    event: type[E]
    handle: Handler
    writes: str
    units: UnitPolicy = ONE_BY_ONE
    admission: Admission = field(default_factory=Admission)
    slots: SlotLedger = NO_SLOTS
    bulk: Callable[[StageContext, list[Any], list[bytes | None]], Iterable[str]] | None = None
    """Takes a whole batch first (the events, and their records' bytes as they came off
    Kafka) and returns the ids it handled completely (no outputs). Its writes must be keyed
    by event id (doing one twice changes nothing): the runner does not mark what it took as
    seen, so a redelivery goes through it again."""
    delivery: Delivery = Delivery.PER_UNIT
    on_loop: bool = False
    observe: Callable[[StageContext, list[BaseModel]], Any] | None = None
    requires: tuple[str, ...] = ()
    """What the stage needs besides its topics and Redis (`workers/pipeline/preflight.py`):
    `base_model`, `engine`. A worker checks it at start-up, before consuming."""
    on_assigned: Callable[[StageContext, set[int]], None] | None = None
    """Called with the partitions of `reads` this worker owns after each rebalance."""
