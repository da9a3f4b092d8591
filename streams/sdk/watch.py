"""Tail a pipeline topic as JSON lines, for consumers of evaluation (or any other) events."""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
from kafka import KafkaConsumer, TopicPartition

from infra.settings import Settings
from streams.sdk.producer import kafka_client_config


def tail(
    settings: Settings,
    topic: str,
    *,
    from_beginning: bool = False,
    timeout_s: float | None = None,
) -> Iterator[dict]:
    """Yield decoded events of a logical topic as they arrive, without joining a group.

    No consumer group: watching must not steal partitions from, or commit offsets for, the
    pipeline's own consumers. Undecodable values are yielded as `{"undecodable": ...}`.
    """
    consumer = KafkaConsumer(**kafka_client_config(settings), enable_auto_commit=False)
    name = settings.topic(topic)
    parts = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
    if not parts:
        consumer.close()
        raise LookupError(f"topic {name!r} does not exist (run `lorastream infra up`)")
    consumer.assign(parts)
    (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*parts)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while deadline is None or time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    try:
                        yield orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        yield {"undecodable": rec.value[:200].decode("utf-8", "replace")}
    finally:
        consumer.close()
