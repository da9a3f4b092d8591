"""Integration fixtures: real Kafka and Redis, one isolated pipeline namespace per test.

Every test gets its own topic prefix, consumer-group prefix (app id) and Redis key prefix
(`settings`), so tests never see each other's data and can run against a shared broker;
everything is removed afterwards (tests/support/namespace.py).

`run` is `settings` on the tiny base model, with the settings a test module (or one test)
asks for through `run_settings` marks:

    pytestmark = pytest.mark.run_settings(group_size=2, update_batch=1)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from infra import services
from infra.settings import Settings
from tests.support import namespace
from workers.catalog.writer import Catalog

INTEGRATION_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "run_settings(**overrides): settings the `run` fixture applies on top of "
        "the test's namespace and the tiny base model (a test's own mark wins over its module's)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (`-m "not integration"`)."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def infra_settings() -> Settings:
    """Base settings (from LORASTREAM_* env) with Kafka and Redis answering.

    Starts them like `lorastream infra up` when needed. If they cannot come up the tests fail in
    CI (CI is set) and are skipped elsewhere, so a laptop without Java still runs unit tests.
    """
    base = Settings()
    try:
        services.ensure_redis(base)
        services.ensure_kafka(base)
    except services.ServiceError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Kafka/Redis did not come up: {exc}")
        pytest.skip(f"Kafka/Redis not available: {exc}")
    return base


@pytest.fixture
def settings(infra_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: unique topic/group/Redis prefixes, 2 partitions, topics created."""
    s = namespace.isolated(infra_settings, tmp_path)
    yield s
    namespace.remove(s)


@pytest.fixture
def run(settings: Settings, tiny_model_dir: Path, request: pytest.FixtureRequest) -> Settings:
    """`settings` on the tiny base model, plus the test's `run_settings` marks (the module's
    first, then the test's own)."""
    overrides: dict[str, Any] = {"base_model": tiny_model_dir}
    for mark in reversed(list(request.node.iter_markers("run_settings"))):
        overrides.update(mark.kwargs)
    return settings.model_copy(update=overrides)


@pytest.fixture
def catalog(settings: Settings) -> Iterator[Catalog]:
    """The real catalog writer for this test's namespace (its topic and Redis index)."""
    writer = Catalog(settings)
    yield writer
    writer.close()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """A Redis client on `settings.redis_url` (bytes responses); keys use `settings.key(...)`."""
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()
