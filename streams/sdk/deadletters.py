"""Dead letters for operators: find them by stage, reason, policy and time, and send the
original bytes back to the stage's input topic once the cause is fixed.

A replay is idempotent. The record goes back byte for byte, with a header naming where it was
first read (`schemas.ids.ORIGIN_HEADER`), so an event whose id was derived from its Kafka
coordinates keeps that id; an event the stage has handled since (a replay run twice, or a
redelivery that went through) is dropped by the stage's seen-marks as a duplicate.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import ValidationError

from infra.security import kafka_python_config
from infra.settings import Settings
from schemas.events import DeadLetter
from schemas.ids import origin_header


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters: every given criterion must hold (None = any)."""

    stage: str | None = None
    reason: str | None = None
    """A case-insensitive part of `<error_type>: <error>`."""
    policy: str | None = None
    since: float | None = None
    until: float | None = None

    def matches(self, letter: DeadLetter) -> bool:
        why = f"{letter.error_type}: {letter.error}".lower()
        return ((self.stage is None or letter.stage == self.stage)
                and (self.reason is None or self.reason.lower() in why)
                and (self.policy is None or letter.policy_id == self.policy)
                and (self.since is None or letter.ts >= self.since)
                and (self.until is None or letter.ts <= self.until))


@dataclass(frozen=True)
class Found:
    """A dead letter and where it sits in the dead-letters topic."""

    letter: DeadLetter
    partition: int
    offset: int

    def row(self) -> dict[str, object]:
        ltr = self.letter
        return {"partition": self.partition, "offset": self.offset, "ts": ltr.ts,
                "stage": ltr.stage, "policy_id": ltr.policy_id, "error_type": ltr.error_type,
                "error": ltr.error, "retryable": ltr.retryable, "topic": ltr.topic,
                "source_partition": ltr.partition, "source_offset": ltr.offset,
                "bytes": len(base64.b64decode(ltr.original_b64))}


def read_letters(settings: Settings, where: LetterFilter = LetterFilter()) -> list[Found]:
    """Every retained dead letter matching `where`, oldest first per partition (no group)."""
    consumer = KafkaConsumer(**kafka_python_config(settings), enable_auto_commit=False)
    name = settings.topic("dead-letters")
    try:
        parts = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
        if not parts:
            raise LookupError(f"topic {name!r} does not exist (run `lorastream infra up`)")
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        found: list[Found] = []
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=500, max_records=2000).values():
                for rec in records:
                    letter = _letter(rec.value)
                    if letter is not None and where.matches(letter):
                        found.append(Found(letter, rec.partition, rec.offset))
        return sorted(found, key=lambda f: (f.letter.ts, f.partition, f.offset))
    finally:
        consumer.close()


def _letter(raw: bytes | None) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate(orjson.loads(raw or b"null"))
    except (orjson.JSONDecodeError, ValidationError):
        return None


@dataclass(frozen=True)
class ReplayReport:
    sent: int
    skipped: list[str]
    """Why letters were not sent (an unknown stage)."""


def replay(settings: Settings, letters: Iterable[Found], inputs: Mapping[str, str]) -> ReplayReport:
    """Send each letter's original bytes to its stage's input topic (`inputs`: stage name ->
    logical topic), keyed by its policy, with the origin header; waits for every ack."""
    producer = KafkaProducer(**kafka_python_config(settings), acks="all", linger_ms=5)
    sent, skipped, futures = 0, [], []
    try:
        for found in letters:
            ltr = found.letter
            if ltr.stage not in inputs:
                skipped.append(f"{found.partition}@{found.offset}: unknown stage {ltr.stage!r}")
                continue
            headers = []
            if ltr.topic is not None and ltr.partition is not None and ltr.offset is not None:
                headers.append(origin_header(ltr.topic, ltr.partition, ltr.offset))
            futures.append(producer.send(
                settings.topic(inputs[ltr.stage]), value=base64.b64decode(ltr.original_b64),
                key=ltr.policy_id.encode() if ltr.policy_id else None, headers=headers))
        for future in futures:
            future.get(timeout=60)
            sent += 1
    finally:
        producer.close(30)
    return ReplayReport(sent, skipped)
