"""The in-flight ledger: how far a policy's sampling may run ahead of its training.

A training interaction takes a slot when the rollout stage samples it, and gives it back when
the trainer consumes its group, or when the group is lost on the way (its sampling failed, the
reward stage dead-lettered it, the update stage refused or failed it). The counters are two
Redis fields per policy (`sampled`, `trained`); `workers.pipeline.units.WithinInFlightRoom`
reads their difference to form rollout units. Each stage names its role in the ledger, and the
runner tells the ledger three things: a unit is handed to the stage, the call is over (and which
events failed), or events were refused before any call. Logged `sft` targets and `dpo` pairs are
not sampled from the policy, so staleness does not apply: they take no slot and give none back
(`takes_slot`, `holds_slot`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from schemas.events import Event, RolloutGenerated, RolloutRewarded
from workers.pipeline.context import StageContext
from workers.pipeline.units import takes_slot


class SlotLedger(Protocol):
    def started(self, ctx: StageContext, events: Sequence[Event]) -> None:
        """`events` are handed to the stage function (before any retry)."""
        ...

    def finished(self, ctx: StageContext, events: Sequence[Event],
                 failed: Collection[str]) -> None:
        """The call is over; `failed` holds the ids of the events it did not handle."""
        ...

    def refused(self, ctx: StageContext, events: Sequence[Event]) -> None:
        """`events` were dead-lettered before the stage saw them (admission)."""
        ...


class NoSlots:
    """Stages after training, and the ones before sampling, hold no slots."""

    def started(self, ctx: StageContext, events: Sequence[Event]) -> None:
        pass

    def finished(self, ctx: StageContext, events: Sequence[Event],
                 failed: Collection[str]) -> None:
        pass

    def refused(self, ctx: StageContext, events: Sequence[Event]) -> None:
        pass


class TakenBySampling(NoSlots):
    """The rollout stage: a training interaction takes a slot when sampled; the slots of those
    that were not sampled after all come back."""

    def started(self, ctx: StageContext, events: Sequence[Event]) -> None:
        _count(ctx, "sampled", [e for e in events if takes_slot(ctx, e)])

    def finished(self, ctx: StageContext, events: Sequence[Event],
                 failed: Collection[str]) -> None:
        _count(ctx, "trained", [e for e in events
                                if e.event_id in failed and takes_slot(ctx, e)])


class FreedWhenLost(NoSlots):
    """The reward stage: a group it dead-letters never reaches the trainer."""

    def finished(self, ctx: StageContext, events: Sequence[Event],
                 failed: Collection[str]) -> None:
        _count(ctx, "trained", [e for e in events if e.event_id in failed and holds_slot(e)])

    def refused(self, ctx: StageContext, events: Sequence[Event]) -> None:
        _count(ctx, "trained", [e for e in events if holds_slot(e)])


class FreedByTraining(NoSlots):
    """The update stage: every group it takes is consumed, trained, failed or refused."""

    def finished(self, ctx: StageContext, events: Sequence[Event],
                 failed: Collection[str]) -> None:
        _count(ctx, "trained", [e for e in events if holds_slot(e)])

    def refused(self, ctx: StageContext, events: Sequence[Event]) -> None:
        _count(ctx, "trained", [e for e in events if holds_slot(e)])


def holds_slot(event: Event) -> bool:
    """A sampled group holds its slot until training; logged sft/dpo groups never took one."""
    rollout = event.rollout if isinstance(event, RolloutRewarded) else event
    return not isinstance(rollout, RolloutGenerated) or rollout.objective == "grpo"


def _count(ctx: StageContext, field: str, events: Sequence[Event]) -> None:
    if events:
        ctx.state.count_many(field, [e.policy_id for e in events])


NO_SLOTS = NoSlots()
