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
from kafka.errors import KafkaError
from pydantic import ValidationError

from infra.security import kafka_python_config
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
    return kafka_python_config(settings)


class InvalidInteraction(ValueError):
    """An interaction log that does not match the `InteractionLogged` schema; nothing was sent.

    `reason` names the first offending field and why (`prompt: String should have at least 1
    character`); `errors` holds pydantic's full list.
    """

    def __init__(self, exc: ValidationError) -> None:
        self.reason = _first_error(exc)
        self.errors = exc.errors()
        super().__init__(f"invalid interaction log: {self.reason}")


class ProduceError(RuntimeError):
    """Kafka did not take the events: broker unreachable, topic missing, or delivery failed."""


class InteractionProducer:
    """Sends `InteractionLogged` events keyed by policy id (one policy stays in order).

    Batching: records wait up to `linger_ms` to share a request (up to `batch_size` bytes).
    Delivery: idempotent (`enable_idempotence`, `acks=all`), so the broker drops the duplicates
    its own `retries` would otherwise write. Every event is validated before it is queued;
    delivery failures are collected and raised as one `ProduceError` by `flush()`.
    """

    def __init__(self, settings: Settings, *, linger_ms: int = 5, batch_size: int = 64 * 1024,
                 retries: int = 5, connect_timeout_s: float = 10.0,
                 delivery_timeout_s: float = 60.0) -> None:
        self.topic = settings.topic("interactions")
        self._where = settings.bootstrap_servers
        self._failures: list[BaseException] = []
        try:
            self._producer = KafkaProducer(
                **kafka_client_config(settings),
                acks="all",
                enable_idempotence=True,
                max_in_flight_requests_per_connection=5,  # the most idempotence keeps ordered
                linger_ms=linger_ms,
                batch_size=batch_size,
                retries=retries,
                bootstrap_timeout_ms=int(connect_timeout_s * 1000),
                max_block_ms=int(connect_timeout_s * 1000),
                delivery_timeout_ms=int(delivery_timeout_s * 1000),
            )
        except KafkaError as exc:
            raise ProduceError(f"cannot reach Kafka at {self._where}: {exc!r} "
                               "(is it up? `lorastream infra status`)") from exc

    @property
    def config(self) -> dict[str, Any]:
        """The delivery settings in effect (acks -1 = all), for checks and debugging."""
        cfg = self._producer.config
        keys = ("acks", "enable_idempotence", "linger_ms", "batch_size", "retries",
                "max_in_flight_requests_per_connection")
        return {k: cfg[k] for k in keys}

    def send(self, interaction: InteractionLogged | dict[str, Any]) -> InteractionLogged:
        """Validate and queue one interaction; returns the validated event (with its id).

        Raises `InvalidInteraction` (nothing sent) or `ProduceError` (Kafka refused it).
        """
        try:
            event = (interaction if isinstance(interaction, InteractionLogged)
                     else InteractionLogged.model_validate(interaction))
        except ValidationError as exc:
            raise InvalidInteraction(exc) from exc
        try:
            future = self._producer.send(self.topic, key=event.policy_id.encode(),
                                         value=encode_event(event))
        except KafkaError as exc:
            raise ProduceError(f"cannot send to {self.topic!r} at {self._where}: {exc!r} "
                               "(does the topic exist? `lorastream infra up` creates it)"
                               ) from exc
        future.add_errback(self._failures.append)
        return event

    def send_many(self, lines: Iterable[str]) -> ProduceReport:
        """Send JSON lines; a bad line is reported with its number and reason, not sent."""
        report = ProduceReport()
        for number, data in _parse_lines(lines, report):
            try:
                self.send(data)
                report.sent += 1
            except InvalidInteraction as exc:
                report.rejected.append((number, exc.reason))
        self.flush()
        return report

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued event is delivered; raise `ProduceError` if any was not."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise ProduceError(f"events not delivered to {self._where} within {timeout:g} s: "
                               f"{exc!r}") from exc
        if self._failures:
            failed, self._failures = self._failures, []
            raise ProduceError(f"{len(failed)} event(s) not delivered to {self.topic!r}: "
                               f"{failed[0]!r}")

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> InteractionProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()
        finally:
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
