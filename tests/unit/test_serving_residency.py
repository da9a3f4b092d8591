"""The residency state machine and rendezvous placement (no Redis needed)."""

from __future__ import annotations

import pytest

from infra.settings import Settings
from workers.serving.assignment import rank_engines
from workers.serving.residency import (
    ALLOWED,
    ControllerConfig,
    Residency,
    ResidencyController,
    TransitionError,
)


def _controller() -> ResidencyController:
    # No Redis call happens until reconcile(); the client is created lazily by redis-py.
    return ResidencyController(Settings(), ControllerConfig("e1", "http://127.0.0.1:1"))


def test_lifecycle_follows_the_explicit_machine() -> None:
    ctl = _controller()
    path = [Residency.QUEUED, Residency.LOADING, Residency.ACTIVE, Residency.DRAINING,
            Residency.EVICTED, Residency.QUEUED, Residency.LOADING, Residency.FAILED,
            Residency.QUEUED]
    for state in path:
        ctl.transition("a@1", state)
    assert ctl.tracked["a@1"].state is Residency.QUEUED


@pytest.mark.parametrize(("start", "bad"), [
    ([], Residency.ACTIVE),
    ([Residency.QUEUED], Residency.ACTIVE),
    ([Residency.QUEUED, Residency.LOADING, Residency.ACTIVE], Residency.LOADING),
    ([Residency.QUEUED, Residency.LOADING, Residency.FAILED], Residency.ACTIVE),
])
def test_disallowed_transitions_raise(start: list[Residency], bad: Residency) -> None:
    ctl = _controller()
    for state in start:
        ctl.transition("a@1", state)
    with pytest.raises(TransitionError):
        ctl.transition("a@1", bad)


def test_every_state_is_reachable_and_terminal_states_can_requeue() -> None:
    reachable = set().union(*ALLOWED.values())
    assert reachable == set(Residency)
    assert Residency.QUEUED in ALLOWED[Residency.EVICTED] & ALLOWED[Residency.FAILED]


def test_rendezvous_placement_is_stable_and_moves_only_the_lost_share() -> None:
    names = [f"p{i}@1" for i in range(2000)]
    three = {n: rank_engines(n, ["a", "b", "c"])[0] for n in names}
    assert three == {n: rank_engines(n, ["c", "a", "b"])[0] for n in names}
    two = {n: rank_engines(n, ["a", "b"])[0] for n in names}
    moved = [n for n in names if three[n] != two[n]]
    assert all(three[n] == "c" for n in moved)  # only c's share moves when c leaves
    assert 500 < sum(v == "c" for v in three.values()) < 830
