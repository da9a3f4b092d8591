"""JSON on the wire, through orjson, registered as the Faust codec `orjson`.

Agents consume raw bytes and decode here, so a malformed value becomes a `PoisonEventError`
the agent can dead-letter, instead of an exception inside Faust's deserializer that would
stop the stream.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from faust.serializers import codecs
from pydantic import BaseModel, ValidationError

from schemas.errors import PoisonEventError
from schemas.ids import record_id

M = TypeVar("M", bound=BaseModel)

MAX_EVENT_BYTES = 4 * 1024 * 1024


class OrjsonCodec(codecs.Codec):
    """Faust codec: Python objects <-> JSON bytes with orjson (never pickle)."""

    def _dumps(self, obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def _loads(self, s: bytes) -> Any:
        return orjson.loads(s)


codecs.register("orjson", OrjsonCodec())
CODEC = codecs.get_codec("orjson")


def encode_event(event: BaseModel) -> bytes:
    """Encode an event as JSON bytes."""
    return CODEC.dumps(event.model_dump(mode="json"))


Origin = tuple[str, int, int]
"""A record's Kafka coordinates: topic, partition, offset."""


def decode_event(model: type[M], raw: bytes | str | None, origin: Origin | None = None) -> M:
    """Decode and validate an event; any defect raises `PoisonEventError` with the reason.

    An event without an `event_id` gets one derived from `origin`, the record's coordinates
    (a producer in another language may leave it out): Kafka redelivers the same record at the
    same coordinates, so the copy dedups. Without an origin the model's default applies."""
    if raw is None:
        raise PoisonEventError("empty value (tombstone or null)")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogateescape")
    if len(raw) > MAX_EVENT_BYTES:
        raise PoisonEventError(f"event of {len(raw)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        data = orjson.loads(raw)  # what CODEC.loads does, minus a wrapper per event
    except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PoisonEventError(f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PoisonEventError(f"expected a JSON object, got {type(data).__name__}")
    if origin is not None and data.get("event_id") is None:
        data["event_id"] = record_id(*origin)
    try:  # the model's own validator: `model_validate`'s wrapper was a tenth of this call
        event: M = model.__pydantic_validator__.validate_python(data)
        return event
    except ValidationError as exc:
        raise PoisonEventError(f"schema violation: {_summarise(exc)}") from exc


def _summarise(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts[:5])
