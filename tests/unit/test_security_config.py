"""Kafka SASL/TLS and Redis AUTH/TLS settings reach every client lorastream builds.

The configs are checked as built (no TLS broker is needed): kafka-python kwargs for the admin,
CLI producers and consumers; aiokafka kwargs with a verifying `ssl_context` for the SDK consumer
and catalog rebuild; Faust `broker_credentials` for the stage workers; Redis clients from a
`rediss://` URL with a password.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import redis
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from infra import admin
from infra.security import aiokafka_config, faust_credentials, kafka_python_config
from infra.settings import Settings
from streams.sdk.producer import kafka_client_config


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A self-signed certificate and key (it doubles as the CA bundle)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "client.pem", d / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=lorastream-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(cert), str(key)


def _sasl_ssl(certs: tuple[str, str, str]) -> Settings:
    ca, cert, key = certs
    return Settings(bootstrap_servers="b1:9093,b2:9093", kafka_security_protocol="SASL_SSL",
                    kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc",
                    kafka_sasl_password=SecretStr("s3cret"), kafka_ssl_cafile=ca,
                    kafka_ssl_certfile=cert, kafka_ssl_keyfile=key)


def test_kafka_python_clients_get_sasl_and_tls(certs: tuple[str, str, str]) -> None:
    s = _sasl_ssl(certs)
    cfg = kafka_python_config(s)
    assert cfg == {
        "bootstrap_servers": ["b1:9093", "b2:9093"], "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
        "sasl_plain_password": "s3cret", "ssl_check_hostname": True,
        "ssl_cafile": certs[0], "ssl_certfile": certs[1], "ssl_keyfile": certs[2],
    }
    assert admin.client_config(s) == cfg == kafka_client_config(s)


def test_aiokafka_and_faust_get_a_verifying_tls_context(certs: tuple[str, str, str]) -> None:
    s = _sasl_ssl(certs)
    cfg = aiokafka_config(s)
    context = cfg.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert cfg["sasl_plain_password"] == "s3cret" and cfg["security_protocol"] == "SASL_SSL"
    creds = faust_credentials(s)
    assert isinstance(creds, SASLCredentials)
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("svc", "s3cret")
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


def test_tls_without_sasl_and_plaintext_defaults(certs: tuple[str, str, str]) -> None:
    tls = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=certs[0])
    assert isinstance(faust_credentials(tls), SSLCredentials)
    assert "sasl_mechanism" not in kafka_python_config(tls)
    plain = Settings()
    assert faust_credentials(plain) is None
    assert kafka_python_config(plain) == {"bootstrap_servers": ["127.0.0.1:9092"],
                                          "security_protocol": "PLAINTEXT"}
    assert "ssl_context" not in aiokafka_config(plain)


def test_settings_pass_to_the_faust_app(certs: tuple[str, str, str]) -> None:
    from streams.app import create_app

    app = create_app(_sasl_ssl(certs), ["reward"])
    assert isinstance(app.conf.broker_credentials, SASLCredentials)
    assert app.conf.broker_credentials.password == "s3cret"


def test_redis_auth_and_tls_come_from_the_url(certs: tuple[str, str, str]) -> None:
    url = f"rediss://:p%40ss@redis.internal:6380/2?ssl_ca_certs={Path(certs[0])}"
    client = redis.Redis.from_url(Settings(redis_url=url).redis_url)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["password"] == "p@ss" and kwargs["ssl_ca_certs"] == certs[0]
    assert kwargs["host"] == "redis.internal" and kwargs["db"] == 2
