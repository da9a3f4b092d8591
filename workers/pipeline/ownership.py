"""Which policies an update worker's trainer holds, with several workers sharing the stage.

A policy's rewards all go to one partition (keyed by policy id), and the consumer group gives
each partition to one worker at a time; a rebalance moves partitions between workers. Three
rules keep every worker's trainer honest:

- **Owned only.** When partitions are assigned, the trainer drops every policy whose partition
  this worker no longer owns (Faust has waited for the batch in hand to finish and committed
  before the new assignment, and every step is already journaled, so dropping loses nothing).
- **Newest state before a step.** Before stepping a policy the trainer's step is compared with
  the policy's journal head (one Redis round trip for all policies of a unit): a policy held
  from before another worker advanced it is dropped, and a policy not held is restored from
  the head. A policy that moved away and came back is never trained on stale weights.
- **Bounded memory.** Policies not stepped for `trainer_idle_evict_s`, and the least recently
  stepped beyond `trainer_max_policies`, are evicted; their journal head is their checkpoint.

The fence that makes two workers unable to both advance one policy is the journal's
(`workers/pipeline/journal.py`); these rules make it rarely needed.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kafka.partitioner.default import murmur2

from workers.pipeline import journal

if TYPE_CHECKING:
    from workers.pipeline.context import StageContext
    from workers.training.multitrainer import MultiPolicyTrainer

log = logging.getLogger(__name__)


def partition_of(policy_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java's, aiokafka's, kafka-python's) gives a
    policy's key."""
    return (murmur2(policy_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass
class Residency:
    """Per trainer: when each policy last stepped, and the partitions this worker owns."""

    last_step: dict[str, float] = field(default_factory=dict)
    owned: frozenset[int] | None = None
    """None until the first assignment (a trainer used outside a consumer group keeps all)."""
    dropped: int = 0
    evicted: int = 0
    stale: int = 0


_RESIDENCY: weakref.WeakKeyDictionary[object, Residency] = weakref.WeakKeyDictionary()


def residency(trainer: object) -> Residency:
    found = _RESIDENCY.get(trainer)
    if found is None:
        found = _RESIDENCY[trainer] = Residency()
    return found


def assigned(ctx: StageContext, partitions: Iterable[int]) -> None:
    """The update stage's rebalance hook: keep only the policies of owned partitions."""
    owned = frozenset(partitions)
    trainer = ctx.loaded_trainer
    if trainer is None:
        return
    res = residency(trainer)
    res.owned = owned
    n = ctx.settings.partitions
    gone = [p for p in trainer.policies() if partition_of(p, n) not in owned]
    for policy in gone:
        _drop(trainer, res, policy)
    res.dropped += len(gone)
    if gone:
        log.info("update: partitions %s assigned; dropped %d policies owned elsewhere now",
                 sorted(owned), len(gone))


def sync_heads(ctx: StageContext, policies: Sequence[str]) -> dict[str, Exception]:
    """Make the trainer hold each policy at its journal head before it steps; returns the
    policies that could not be restored (e.g. an unreadable checkpoint), with the error."""
    trainer, book = ctx.trainer, journal.journal_of(ctx)
    res = residency(trainer)
    heads = journal.RedisHeads(ctx.state.r, ctx.state.keys).get_many(policies)
    failures: dict[str, Exception] = {}
    for policy in policies:
        try:
            head = heads[policy] or book.head(policy)
            if trainer.has_policy(policy) and trainer.steps_done(policy) != journal.step_of(head):
                log.warning("update: %s is at step %d here but at step %d in the journal "
                            "(another worker stepped it); reloading", policy,
                            trainer.steps_done(policy), journal.step_of(head))
                _drop(trainer, res, policy)
                res.stale += 1
            if not trainer.has_policy(policy) and head is not None:
                book.restore(policy, trainer)
        except Exception as exc:  # only this policy fails
            failures[policy] = exc
    return failures


def stepped(ctx: StageContext, policies: Iterable[str], now: float | None = None) -> None:
    """Note the policies just stepped, then evict idle and excess ones."""
    trainer = ctx.trainer
    res = residency(trainer)
    now = time.monotonic() if now is None else now
    for policy in policies:
        res.last_step[policy] = now
    s = ctx.settings
    held = sorted(trainer.policies(), key=lambda p: res.last_step.get(p, 0.0))
    idle = [p for p in held if now - res.last_step.get(p, now) > s.trainer_idle_evict_s]
    excess = held[:max(0, len(held) - s.trainer_max_policies)]
    for policy in dict.fromkeys([*idle, *excess]):
        _drop(trainer, res, policy)
        res.evicted += 1


def forget(ctx: StageContext, policy_id: str) -> None:
    """Drop a policy whose step was fenced off: its weights here are not the newest."""
    trainer = ctx.trainer
    _drop(trainer, residency(trainer), policy_id)


def _drop(trainer: MultiPolicyTrainer, res: Residency, policy_id: str) -> None:
    trainer.drop_policy(policy_id)
    res.last_step.pop(policy_id, None)
