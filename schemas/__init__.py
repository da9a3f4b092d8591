"""Versioned event schemas: one pydantic model per event, encoded as JSON with orjson.

Readers tolerate unknown fields (they are ignored), so producers may add fields without
breaking older consumers; a breaking change gets a new `schema_version`.
"""

from schemas.codec import decode_event, encode_event
from schemas.events import (
    EVENT_TYPES,
    AdapterEvaluated,
    AdapterExported,
    AnswerServed,
    ChatMessage,
    Completion,
    DeadLetter,
    Event,
    InteractionLogged,
    PolicyPaused,
    PolicyPromoted,
    PolicyResumed,
    PolicyRolledBack,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
)

__all__ = [
    "EVENT_TYPES",
    "AdapterEvaluated",
    "AdapterExported",
    "AnswerServed",
    "ChatMessage",
    "Completion",
    "DeadLetter",
    "Event",
    "InteractionLogged",
    "PolicyPaused",
    "PolicyPromoted",
    "PolicyResumed",
    "PolicyRolledBack",
    "PolicyUpdated",
    "RolloutGenerated",
    "RolloutRewarded",
    "decode_event",
    "encode_event",
]
