"""How the rollout stage groups fresh training interactions into units: one unit, one engine call.

Sampling is the rollout stage's whole cost, and the engine batches rows of different adapters
into shared forwards, so the stage hands it the interactions of many policies at once
(`workers.pipeline.rollout.rollout_many`) instead of one interaction per call. Two bounds shape a
unit:

- rows: at most `ROLLOUT_UNIT_ROWS` sampled rows (interactions x `group_size`), i.e. at most
  `unit_capacity(group_size)` interactions. Every rollout of a unit waits for the unit's slowest
  row, and a unit is redone whole on a retry, so bigger is not free;
- staleness: a policy takes at most its in-flight room (`max_in_flight` minus the groups it has
  sampled that the trainer has not consumed yet), read from Redis when the unit is formed. Its
  later interactions go to later units, formed after this one is handled, so a policy's
  rollouts keep their order and never run further ahead of its trainer than one at a time
  would. When no pending policy has room, the stream waits for a trainer (polling), and after
  `MAX_IN_FLIGHT_WAIT_S` lets the oldest waiting interaction through anyway, as before: a
  trainer that is down must not stop sampling for good.

The slots themselves are taken (`note_sampled`) by the runner once a unit is admitted, and given
back for whatever was not sampled (see `StageRunner._with_retries`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from schemas.events import Event, InteractionLogged
from workers.rewards.functions import REWARD_FUNCTIONS

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
    not wait for a trainer only to be dead-lettered)."""
    return (isinstance(event, InteractionLogged) and event.split == "train"
            and event.task in REWARD_FUNCTIONS)


def unit_capacity(group_size: int) -> int:
    """Interactions per unit: as many groups as fit in `ROLLOUT_UNIT_ROWS`, at least one."""
    return max(1, ROLLOUT_UNIT_ROWS // group_size)


def take_unit(pending: Sequence[D], room: Mapping[str, int],
              capacity: int) -> tuple[list[D], list[D]]:
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
        needs_room = throttled(event)
        if (policy in blocked or len(unit) >= capacity
                or (needs_room and taken.get(policy, 0) >= room.get(policy, 0))):
            blocked.add(policy)
            rest.append(d)
            continue
        if needs_room:
            taken[policy] = taken.get(policy, 0) + 1
        unit.append(d)
    return unit, rest


async def units(pending: Sequence[D], *, capacity: int, limit: int,
                in_flight: Callable[[list[str]], Mapping[str, int]],
                wait_s: float = MAX_IN_FLIGHT_WAIT_S) -> AsyncIterator[list[D]]:
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
        policies = list(dict.fromkeys(d[1].policy_id for d in left if throttled(d[1])))
        counts = in_flight(policies) if policies else {}
        room = {p: limit - counts[p] for p in policies}
        unit, rest = take_unit(left, room, capacity)
        if not unit:
            now = time.monotonic()
            waiting_since = now if waiting_since is None else waiting_since
            if now - waiting_since < wait_s:
                await asyncio.sleep(IN_FLIGHT_POLL_S)
                continue
            unit, rest = take_unit(left, {**room, left[0][1].policy_id: 1}, capacity)
        waiting_since = None
        left = rest
        yield unit
