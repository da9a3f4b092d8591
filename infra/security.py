"""Kafka connection security from `Settings`, in the three dialects lorastream's clients speak.

kafka-python (admin, CLI producers/consumers), aiokafka (SDK consumer, catalog rebuild) and
Faust (the stage workers) each spell SASL and TLS differently. Building all three here from the
same settings means a cluster that needs SASL_SSL is configured once, and no client can be
forgotten (a test checks each dialect). Redis AUTH and TLS need nothing here: they are part of
`redis_url` (`rediss://:PASSWORD@host:6380/0?ssl_ca_certs=/path/ca.pem`), which every Redis
client is built from with `redis.Redis.from_url`.
"""

from __future__ import annotations

import ssl
from typing import Any

from infra.settings import Settings

TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


def _password(settings: Settings) -> str | None:
    pw = settings.kafka_sasl_password
    return pw.get_secret_value() if pw is not None else None


def _connection(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers, protocol and SASL: the same keys for kafka-python and aiokafka."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        cfg["sasl_mechanism"] = settings.kafka_sasl_mechanism
        cfg["sasl_plain_username"] = settings.kafka_sasl_username
        cfg["sasl_plain_password"] = _password(settings)
    return cfg


def kafka_python_config(settings: Settings) -> dict[str, Any]:
    """kwargs for kafka-python's KafkaProducer/KafkaConsumer/KafkaAdminClient."""
    cfg = _connection(settings)
    if settings.kafka_security_protocol in TLS_PROTOCOLS:
        cfg["ssl_check_hostname"] = True
        for name in ("cafile", "certfile", "keyfile"):
            value = getattr(settings, f"kafka_ssl_{name}")
            if value:
                cfg[f"ssl_{name}"] = value
    return cfg


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A verifying TLS context (CA bundle, optional client certificate), or None without TLS."""
    if settings.kafka_security_protocol not in TLS_PROTOCOLS:
        return None
    ctx = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        ctx.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return ctx


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """kwargs for aiokafka's AIOKafkaConsumer/AIOKafkaProducer (TLS as an `ssl_context`)."""
    cfg = _connection(settings)
    context = ssl_context(settings)
    if context is not None:
        cfg["ssl_context"] = context
    return cfg


def faust_credentials(settings: Settings) -> Any:
    """Faust's `broker_credentials`: SASL (over TLS when asked), TLS alone, or None."""
    import faust

    context = ssl_context(settings)
    if settings.kafka_security_protocol in SASL_PROTOCOLS:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=_password(settings),
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
