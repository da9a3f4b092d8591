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
