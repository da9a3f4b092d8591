"""Held-out prompts back into Redis from the `interactions` topic, after Redis lost them.

The catalog rebuild restores every revision and alias from the compacted catalog topic, but the
held-out prompts the evaluate stage scores revisions on live only in Redis (the rollout stage
stores them). Their source of truth is the `interactions` topic itself, so a rebuild replays it:
every valid held-out interaction still within the topic's retention (a week by default) is
stored again, exactly as the rollout stage's bulk path stores it; invalid records are skipped
(the rollout stage dead-lettered them when they arrived).
"""

from __future__ import annotations

from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from infra.admin import client_config
from infra.settings import Settings
from schemas.codec import decode_event
from schemas.events import InteractionLogged
from workers.errors import PoisonEventError
from workers.stages import storable_heldout
from workers.state import PolicyState

BATCH = 5000


def replay_heldout(settings: Settings, state: PolicyState | None = None,
                   progress: Callable[[str], None] | None = None) -> int:
    """Store every held-out interaction on the topic (up to its end when this started);
    returns how many. Idempotent: a prompt is one hash field keyed by its event id."""
    state = state or PolicyState(settings)
    topic = settings.topic("interactions")
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, group_id=None,
                             fetch_max_wait_ms=100)
    stored, pending = 0, []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                          or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        remaining = {tp: end for tp, end in consumer.end_offsets(parts).items()
                     if end > consumer.position(tp)}
        while remaining:
            for records in consumer.poll(timeout_ms=500, max_records=BATCH).values():
                pending += storable_heldout([i for i in map(_decoded, records) if i])
            remaining = {tp: end for tp, end in remaining.items() if consumer.position(tp) < end}
            if len(pending) >= BATCH or not remaining:
                state.add_heldout_many(pending)
                stored += len(pending)
                pending = []
                if progress:
                    progress(f"held-out prompts: {stored}")
    finally:
        consumer.close()
    return stored


def _decoded(record: ConsumerRecord) -> InteractionLogged | None:
    try:
        return decode_event(InteractionLogged, record.value)
    except PoisonEventError:
        return None
