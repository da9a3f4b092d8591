"""How a stage cuts a batch off its stream into units: one unit, one call of the stage.

Four policies, one per kind of stage:

- `OneByOne`: every event is its own unit (export, evaluate, promote);
- `WholeBatch`: the batch is one unit, for a stage that handles its events concurrently (the
  reward stage: an HTTP judge keeps many groups in flight at once);
- `PerPolicyRounds`: up to `update_batch` events of each of many policies per unit, a policy's
  later events in later units (the update stage trains them all in one multi-policy step);
- `WithinInFlightRoom`: the rollout stage's. Sampling is its whole cost, and the engine batches
  rows of different adapters into shared forwards, so a unit holds the interactions of many
  policies (`workers.pipeline.rollout.rollout_many`). Two bounds shape it:
  - rows: at most `ROLLOUT_UNIT_ROWS` sampled rows (interactions x `group_size`), i.e. at most
    `unit_capacity(group_size)` interactions. Every rollout of a unit waits for the unit's
    slowest row, and a unit is redone whole on a retry, so bigger is not free;
  - staleness: a policy takes at most its in-flight room (`max_in_flight` minus the groups it
    has sampled that the trainer has not consumed yet), read from Redis when the unit is
    formed. Its later interactions go to later units, formed after this one is handled, so a
    policy's rollouts keep their order and never run further ahead of its trainer than one at
    a time would. When no pending policy has room, the stream waits for a trainer (polling),
    and after `MAX_IN_FLIGHT_WAIT_S` lets the oldest waiting interaction through anyway: a
    trainer that is down must not stop sampling for good.

The slots themselves are taken and given back by the stage's ledger (`workers/pipeline/
inflight.py`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from infra.settings import Settings
from schemas.events import Event, InteractionLogged
from workers.rewards.functions import REWARD_FUNCTIONS

if TYPE_CHECKING:
    from workers.pipeline.context import StageContext

ROLLOUT_UNIT_ROWS = 64
"""Most sampled rows in one rollout unit (one /generate call). 64 is the CPU engine's default
`max_running_requests`: a unit of up to `max_loras_per_batch` (4) adapters decodes as ONE
engine batch, while more rows would only queue behind each other inside the engine. With the
default `group_size` of 6 that is 10 interactions a unit."""
MAX_IN_FLIGHT_WAIT_S = 60.0
"""How long the stream waits for a trainer before it samples over a policy's in-flight limit."""
IN_FLIGHT_POLL_S = 0.05

D = TypeVar("D", bound=tuple[Any, Event])
"""A decoded record: (where it came from, the event)."""


def throttled(event: Event) -> bool:
    """Only training interactions are sampled, so only they take in-flight slots; one whose
    reward function does not exist is refused before any sampling, so it takes none (it must
    not wait for a trainer only to be dead-lettered). With the built-in rewards and no policy
    configuration; the stage itself asks `takes_slot`."""
    return (isinstance(event, InteractionLogged) and event.split == "train"
            and event.task in REWARD_FUNCTIONS)


def takes_slot(ctx: StageContext, event: Event) -> bool:
    """`throttled` with the process's rewards and each policy's configuration: a training
    interaction takes a slot when it will be sampled, i.e. its objective is `grpo` (logged
    `sft` targets and `dpo` pairs are not sampled from the policy) and its reward exists."""
    if not (isinstance(event, InteractionLogged) and event.split == "train"):
        return False
    config = ctx.configs.get(event.policy_id)
    return config.objective_for(event) == "grpo" and config.reward_for(event) in ctx.rewards


def unit_capacity(group_size: int) -> int:
    """Interactions per unit: as many groups as fit in `ROLLOUT_UNIT_ROWS`, at least one."""
    return max(1, ROLLOUT_UNIT_ROWS // group_size)


def take_unit(pending: Sequence[D], room: Mapping[str, int], capacity: int,
              needs_room: Callable[[Event], bool] = throttled) -> tuple[list[D], list[D]]:
    """The next unit out of `pending` (in order), and what is left for later units.

    A policy's training interactions take at most `room[policy]` places; once one of a policy's
    events is left for later (no room, or the unit is full), so are all its later ones, so a
    policy's interactions are sampled in the order they arrived. Other events (held-out prompts
    the bulk path did not take, unknown reward functions: they only dead-letter) need no room.
    """
    unit: list[D] = []
    rest: list[D] = []
    taken: dict[str, int] = {}
    blocked: set[str] = set()
    for d in pending:
        event = d[1]
        policy = event.policy_id
        slot = needs_room(event)
        if (policy in blocked or len(unit) >= capacity
                or (slot and taken.get(policy, 0) >= room.get(policy, 0))):
            blocked.add(policy)
            rest.append(d)
            continue
        if slot:
            taken[policy] = taken.get(policy, 0) + 1
        unit.append(d)
    return unit, rest


DRAINING = threading.Event()
"""Set while this process's consumer group rebalances (`streams/runner/rebalance.py`): Faust
waits for the batch in hand before it gives partitions up, so a unit must not wait for
in-flight room meanwhile. Room is freed by training, which may sit in this very process (a
`rollout,reward` worker), paused by the same rebalance: waiting would stall the group."""


async def units(pending: Sequence[D], *, capacity: int, limit: int,
                in_flight: Callable[[list[str]], Mapping[str, int]],
                wait_s: float = MAX_IN_FLIGHT_WAIT_S,
                needs_room: Callable[[Event], bool] = throttled) -> AsyncIterator[list[D]]:
    """Units of `pending`, each formed when the previous one has been handled (the caller
    handles a unit before asking for the next), from the in-flight counts of that moment.

    `in_flight(policies)` gives each policy's outstanding sampled groups (one Redis round trip
    for the unit), `limit` the most one may have. Waits while no pending policy has room;
    after `wait_s` of waiting the first pending interaction goes anyway (its policy one over
    the limit).
    """
    left = list(pending)
    waiting_since: float | None = None
    while left:
        policies = list(dict.fromkeys(d[1].policy_id for d in left if needs_room(d[1])))
        counts = in_flight(policies) if policies else {}
        room = {p: limit - counts[p] for p in policies}
        unit, rest = take_unit(left, room, capacity, needs_room)
        if not unit:
            now = time.monotonic()
            waiting_since = now if waiting_since is None else waiting_since
            if now - waiting_since < wait_s and not DRAINING.is_set():
                await asyncio.sleep(IN_FLIGHT_POLL_S)
                continue
            unit, rest = take_unit(left, {**room, left[0][1].policy_id: 1}, capacity,
                                   needs_room)
        waiting_since = None
        left = rest
        yield unit


# -- the three unit policies ------------------------------------------------------------------
STREAM_WINDOW_S = 0.05
"""How long a stage waits to fill a batch of up to `stream_batch` events."""
ROUNDS_WINDOW_S = 0.2
"""How long the update stage waits to fill a batch: fuller steps are worth a little latency."""


class UnitPolicy(Protocol):
    """How a stage takes its stream (batch size, wait) and cuts a batch into units."""

    def take(self, settings: Settings) -> tuple[int, float]:
        """(most events per batch, seconds to wait for them)."""
        ...

    def units(self, ctx: StageContext, batch: list[D]) -> AsyncIterator[list[D]]:
        """The batch's units in handling order; the caller handles each before the next."""
        ...


class OneByOne:
    """Each event is its own unit."""

    def take(self, settings: Settings) -> tuple[int, float]:
        return settings.stream_batch, STREAM_WINDOW_S

    async def units(self, ctx: StageContext, batch: list[D]) -> AsyncIterator[list[D]]:
        for d in batch:
            yield [d]


@dataclass(frozen=True)
class WholeBatch:
    """The whole batch is one unit; `scale` x `stream_batch` events a batch. A stage that waits
    on a remote service once per batch (the reward stage's judge) amortises that wait over
    more events with a bigger batch (`loadtests/rewards.py`)."""

    scale: int = 1

    def take(self, settings: Settings) -> tuple[int, float]:
        return settings.stream_batch * self.scale, STREAM_WINDOW_S

    async def units(self, ctx: StageContext, batch: list[D]) -> AsyncIterator[list[D]]:
        if batch:
            yield list(batch)


@dataclass(frozen=True)
class PerPolicyRounds:
    """Up to `update_batch` events of each of up to `policies` policies per unit."""

    policies: int = 8

    def take(self, settings: Settings) -> tuple[int, float]:
        return settings.update_batch * self.policies, ROUNDS_WINDOW_S

    async def units(self, ctx: StageContext, batch: list[D]) -> AsyncIterator[list[D]]:
        for unit in rounds(batch, ctx.settings.update_batch):
            yield unit


class WithinInFlightRoom:
    """Interactions of many policies per unit, each policy within its in-flight room."""

    def take(self, settings: Settings) -> tuple[int, float]:
        return settings.stream_batch, STREAM_WINDOW_S

    async def units(self, ctx: StageContext, batch: list[D]) -> AsyncIterator[list[D]]:
        s, state = ctx.settings, ctx.state
        async for unit in units(batch, capacity=unit_capacity(s.group_size),
                                limit=s.max_in_flight, in_flight=state.in_flight_many,
                                needs_room=lambda e: takes_slot(ctx, e)):
            yield unit


def rounds(batch: Sequence[D], size: int) -> list[list[D]]:
    """Round k holds events k*size..(k+1)*size-1 of every policy, so a policy's groups keep
    their order across rounds."""
    by_policy: dict[str, list[D]] = {}
    for d in batch:
        by_policy.setdefault(d[1].policy_id, []).append(d)
    count = max((len(ds) + size - 1) // size for ds in by_policy.values()) if batch else 0
    return [[d for ds in by_policy.values() for d in ds[k * size:(k + 1) * size]]
            for k in range(count)]


ONE_BY_ONE = OneByOne()
