"""Deterministic event ids: the same input always yields the same output id.

Kafka delivers at least once. When a stage re-processes a redelivered event, its outputs carry
the ids they had the first time, so every downstream stage can drop the duplicate by id.
"""

from __future__ import annotations

import hashlib


def derive_id(stage: str, *parts: str | int) -> str:
    """A 32-hex-char id from the stage name and the ids/numbers that caused the event."""
    h = hashlib.sha256(stage.encode())
    for part in parts:
        h.update(b"\x1f")
        h.update(str(part).encode())
    return h.hexdigest()[:32]


def derive_seed(*parts: str | int) -> int:
    """A 31-bit sampling seed, so a redelivered interaction samples the same completions."""
    return int(derive_id("seed", *parts)[:8], 16) & 0x7FFFFFFF


ORIGIN_HEADER = "lorastream-origin"
"""Kafka header a re-sent record (a replayed dead letter) carries: where it was first read, as
`topic/partition/offset`, so an id derived from coordinates stays the first record's."""


def record_id(topic: str, partition: int, offset: int) -> str:
    """The id of an event that came without one: its record's Kafka coordinates."""
    return derive_id("record", topic, partition, offset)


def origin_header(topic: str, partition: int, offset: int) -> tuple[str, bytes]:
    return ORIGIN_HEADER, f"{topic}/{partition}/{offset}".encode()


def parse_origin(value: bytes | str) -> tuple[str, int, int] | None:
    """The coordinates an origin header names; None when it is not one."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    topic, _, rest = text.partition("/")
    partition, _, offset = rest.partition("/")
    if not topic or not partition.isdigit() or not offset.isdigit():
        return None
    return topic, int(partition), int(offset)
