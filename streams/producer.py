"""Producer SDK: validate interaction logs against the schema, then send them idempotently.

Validation happens before anything is sent, so a producer learns at once which line is wrong
and why; events that do reach Kafka are therefore well-formed, and the stages' dead-letter path
is for what slips through other producers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaProducer
from pydantic import ValidationError

from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import InteractionLogged


@dataclass
class ProduceReport:
    """What a bulk send did: how many went out, and each rejected line with its reason."""

    sent: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by every kafka-python client (security passes through)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        cfg["sasl_mechanism"] = settings.kafka_sasl_mechanism
        cfg["sasl_plain_username"] = settings.kafka_sasl_username
        pw = settings.kafka_sasl_password
        cfg["sasl_plain_password"] = pw.get_secret_value() if pw else None
    return cfg


class InteractionProducer:
    """Sends `InteractionLogged` events keyed by policy id (one policy stays in order)."""

    def __init__(self, settings: Settings, *, linger_ms: int = 5) -> None:
        self.topic = settings.topic("interactions")
        self._producer = KafkaProducer(
            **kafka_client_config(settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            retries=5,
        )

    def send(self, interaction: InteractionLogged | dict[str, Any]) -> InteractionLogged:
        """Validate and send one interaction; returns the validated event (with its id)."""
        event = (
            interaction
            if isinstance(interaction, InteractionLogged)
            else InteractionLogged.model_validate(interaction)
        )
        self._producer.send(self.topic, key=event.policy_id.encode(), value=encode_event(event))
        return event

    def send_many(self, lines: Iterable[str]) -> ProduceReport:
        """Send JSON lines; a bad line is reported with its number and reason, not sent."""
        report = ProduceReport()
        for number, data in _parse_lines(lines, report):
            try:
                self.send(data)
                report.sent += 1
            except ValidationError as exc:
                report.rejected.append((number, _first_error(exc)))
        self.flush()
        return report

    def flush(self, timeout: float = 30.0) -> None:
        self._producer.flush(timeout=timeout)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> InteractionProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.close()


def _parse_lines(lines: Iterable[str], report: ProduceReport) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            report.rejected.append((number, f"malformed JSON: {exc}"))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    more = exc.error_count() - 1
    return f"{loc}: {err['msg']}" + (f" (+{more} more)" if more else "")
