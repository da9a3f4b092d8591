"""Redis state whose source of truth is a pipeline topic, replayed after Redis lost it.

The catalog rebuild restores every revision and alias from the compacted catalog topic. Two more
kinds of state live only in Redis but are derived from topics, so a rebuild replays those too:

- held-out prompts (the evaluate stage scores revisions on them) from `interactions`: every
  valid held-out interaction is stored again, exactly as the rollout stage's bulk path stores
  it; invalid records are skipped (the rollout stage dead-lettered them when they arrived);
- training pauses from `promotions`: `PolicyPaused` and `PolicyResumed` are keyed by policy, so
  one policy's are in order on one partition and the last one wins.

Both reach back as far as the topics' retention (a week by default).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from infra.admin import client_config
from infra.settings import Settings
from schemas.codec import decode_event
from schemas.errors import PoisonEventError
from schemas.events import Event, InteractionLogged, PolicyPaused, PolicyResumed
from workers.pipeline.context import StageContext
from workers.pipeline.rollout import storable_heldout
from workers.pipeline.state import PolicyState

BATCH = 5000
Progress = Callable[[str], None]


def replay_heldout(settings: Settings, state: PolicyState | None = None,
                   progress: Progress | None = None) -> int:
    """Store every held-out interaction on the topic (up to its end when this started);
    returns how many. Idempotent: a prompt is one hash field keyed by its event id."""
    state = state or PolicyState(settings)
    ctx = StageContext.create(settings)
    stored = 0

    def store(records: list[ConsumerRecord]) -> None:
        nonlocal stored
        held = storable_heldout([e for e in map(_decoded, records)
                                 if isinstance(e, InteractionLogged)], ctx)
        state.add_heldout_many(held)
        stored += len(held)
        if progress:
            progress(f"held-out prompts: {stored}")

    _read(settings, "interactions", store)
    return stored


def replay_pauses(settings: Settings, state: PolicyState | None = None) -> list[str]:
    """Set each policy's pause state to what its last pause/resume event says; returns the
    policies paused afterwards."""
    from workers.pipeline.guards import restore_pause

    state = state or PolicyState(settings)
    last: dict[str, PolicyPaused | PolicyResumed] = {}

    models: dict[str | None, type[Event]] = {"policy_paused": PolicyPaused,
                                             "policy_resumed": PolicyResumed}

    def fold(records: list[ConsumerRecord]) -> None:
        for record in records:
            model = models.get(_kind(record.value))
            event = _decoded(record, model) if model is not None else None
            if isinstance(event, PolicyPaused | PolicyResumed):
                last[event.policy_id] = event

    _read(settings, "promotions", fold)
    for event in last.values():
        restore_pause(state, event)
    return sorted(p for p, e in last.items() if isinstance(e, PolicyPaused))


def _read(settings: Settings, name: str,
          handle: Callable[[list[ConsumerRecord]], None]) -> None:
    """Hand every record of a topic, from the beginning to the end offsets seen at the start,
    to `handle` in batches (no consumer group: nothing is committed)."""
    topic = settings.topic(name)
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, group_id=None,
                             fetch_max_wait_ms=100)
    try:
        parts = [TopicPartition(topic, p)
                 for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        remaining = {tp: end for tp, end in ends.items() if end > consumer.position(tp)}
        while remaining:
            batch = consumer.poll(timeout_ms=500, max_records=BATCH)
            for records in batch.values():
                handle(records)
            remaining = {tp: end for tp, end in remaining.items() if consumer.position(tp) < end}
    finally:
        consumer.close()


def _kind(raw: bytes | None) -> str | None:
    try:
        data = orjson.loads(raw or b"null")
    except orjson.JSONDecodeError:
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _decoded(record: ConsumerRecord, model: type[Event] = InteractionLogged) -> Event | None:
    try:
        return decode_event(model, record.value)
    except PoisonEventError:
        return None
