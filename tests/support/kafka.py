"""Records in and out of the real broker for tests: raw writes (no validation, no encoding),
reads of a whole topic, offsets committed as a group member would, and drained groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from infra import admin
from infra.security import kafka_python_config
from infra.settings import Settings
from streams.sdk.watch import tail


def produce(settings: Settings, tp: TopicPartition, values: list[bytes]) -> None:
    """Write `values` to one partition and wait until the broker has them all."""
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    try:
        for value in values:
            producer.send(tp.topic, value=value, partition=tp.partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def produce_raw(settings: Settings, topic: str,
                items: Sequence[tuple[bytes | None, bytes]]) -> None:
    """Send raw (key, value) pairs to a logical topic exactly as given: no validation, no
    encoding."""
    producer = KafkaProducer(**kafka_python_config(settings), acks="all")
    try:
        for key, value in items:
            producer.send(settings.topic(topic), key=key, value=value)
        producer.flush(30)
    finally:
        producer.close(10)


def read_topic(settings: Settings, topic: str, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """Every event on a logical topic so far (no consumer group)."""
    return list(tail(settings, topic, from_beginning=True, timeout_s=timeout_s))


def commit(settings: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit offsets for `group` the way a group member would (no records need reading)."""
    consumer = KafkaConsumer(**admin.client_config(settings), group_id=group,
                             enable_auto_commit=False)
    try:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
    finally:
        consumer.close()


def drained(settings: Settings, group: str, topics: list[str]) -> bool:
    """The group has committed offsets on every one of `topics`, all at the log end."""
    rows = admin.consumer_lag(settings, group)
    names = {settings.topic(t) for t in topics}
    seen = {r.topic for r in rows if r.topic in names}
    return seen == names and all(r.lag == 0 for r in rows if r.topic in names)
