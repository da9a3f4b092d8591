"""Where a record was first read: a replayed dead letter carries its first coordinates in a
header, so an event id derived from coordinates (`schemas.ids.record_id`) survives the replay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from schemas.codec import Origin
from schemas.ids import ORIGIN_HEADER, parse_origin

Headers = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | Any


def first_read_at(headers: Headers) -> Origin | None:
    """The origin header of a Faust message's headers (a list of pairs or a mapping)."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        name = key.decode() if isinstance(key, bytes) else key
        if name == ORIGIN_HEADER and value is not None:
            return parse_origin(value)
    return None
