"""How the rollout stage groups interactions into units: within each policy's in-flight room, at
most a unit's capacity, a policy's interactions in order, and a wait (not a spin past the
limit) when no policy has room."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from schemas.events import InteractionLogged
from workers.pipeline import units as rollout_units
from workers.pipeline.units import take_unit, unit_capacity

Item = tuple[Any, InteractionLogged]


def _items(*spec: str) -> list[Item]:
    """'a' = a training interaction of policy a, 'a!' = a held-out one, 'a?' = one whose
    reward function does not exist."""
    out: list[Item] = []
    for k, s in enumerate(spec):
        split: Literal["train", "eval"] = "eval" if s.endswith("!") else "train"
        task = "no-such-reward" if s.endswith("?") else "length"
        out.append((k, InteractionLogged(policy_id=s.rstrip("!?"), prompt=f"p{k}?", split=split,
                                         task=task)))
    return out


def _names(items: list[Item]) -> list[int]:
    return [k for k, _ in items]


def test_capacity_is_rows_over_group_size() -> None:
    assert unit_capacity(6) == rollout_units.ROLLOUT_UNIT_ROWS // 6
    assert unit_capacity(10_000) == 1


def test_a_unit_takes_each_policy_up_to_its_room_and_keeps_its_order() -> None:
    items = _items("a", "b", "a", "c", "a", "b", "c!")
    unit, rest = take_unit(items, {"a": 2, "b": 1, "c": 0}, capacity=10)
    assert _names(unit) == [0, 1, 2]
    # c's held-out event needs no room, but waits behind c's blocked training interaction.
    assert _names(rest) == [3, 4, 5, 6]


def test_events_that_will_not_be_sampled_need_no_room() -> None:
    unit, rest = take_unit(_items("a!", "a?", "a!", "b"), {}, capacity=10)
    assert (_names(unit), _names(rest)) == ([0, 1, 2], [3])


def test_a_full_unit_leaves_the_rest_in_order() -> None:
    unit, rest = take_unit(_items("a", "b", "a", "b"), {"a": 5, "b": 5}, capacity=3)
    assert (_names(unit), _names(rest)) == ([0, 1, 2], [3])


async def test_units_are_formed_from_the_room_left_after_the_previous_unit() -> None:
    """The caller handles a unit (taking its slots) before the next one is formed; a policy
    without room waits for its trainer while the others go on."""
    in_flight = {"a": 1, "b": 0}
    trainer = {1: {"b": 0}, 2: {"a": 1}, 3: {"a": 1}}  # after unit k, the trainers consume
    got: list[list[int]] = []
    gen = rollout_units.units(_items("a", "a", "b", "a", "b", "b"), capacity=8, limit=2,
                              in_flight=lambda ps: {p: in_flight[p] for p in ps})
    async for unit in gen:
        got.append(_names(unit))
        for _, event in unit:  # what the runner does: note_sampled per training interaction
            in_flight[event.policy_id] += 1
        assert max(in_flight.values()) <= 2
        in_flight.update(trainer.get(len(got), {}))
    assert got == [[0, 2, 4], [5], [1], [3]]


async def test_after_the_wait_the_oldest_interaction_goes_over_the_limit() -> None:
    gen = rollout_units.units(_items("a", "a"), capacity=8, limit=1,
                              in_flight=lambda ps: dict.fromkeys(ps, 5), wait_s=0.0)
    got = [_names(u) async for u in gen]
    assert got == [[0], [1]]


async def test_no_room_means_a_wait_until_the_trainer_frees_a_slot() -> None:
    polls = 0

    def lookup(policies: list[str]) -> dict[str, int]:
        nonlocal polls
        polls += 1
        # the trainer consumes the group by the third look
        return dict.fromkeys(policies, 1 if polls < 3 else 0)

    gen = rollout_units.units(_items("a"), capacity=8, limit=1, in_flight=lookup)
    got = await asyncio.wait_for(anext(gen), timeout=10)
    assert _names(got) == [0] and polls == 3
