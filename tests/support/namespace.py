"""One test's own pipeline namespace on the shared broker and Redis: a topic prefix, a
consumer-group prefix (app id) and a Redis key prefix nobody else uses, and their removal
afterwards (best effort: a failed cleanup must not fail the test)."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis

from infra import admin
from infra.settings import Settings


def isolated(base: Settings, data_root: Path) -> Settings:
    """`base` with unique topic/group/Redis prefixes, 2 partitions and its files under
    `data_root`; its topics are created."""
    tag = f"t{uuid.uuid4().hex[:12]}"
    overrides = {
        "topic_prefix": f"{tag}.",
        "app_id": tag,
        "redis_prefix": f"{tag}:",
        "partitions": 2,
        "data_dir": data_root / "data",
        "artifact_dir": data_root / "artifacts",
    }
    s = Settings(**{**base.model_dump(), **overrides})
    admin.create_topics(s)
    return s


def remove(s: Settings) -> None:
    """Delete the namespace's topics, consumer groups and Redis keys; never raises."""
    steps = (
        lambda: admin.delete_topics(s, admin.list_topics(s, s.topic_prefix)),
        lambda: admin.delete_groups(s, s.app_id),
        lambda: _delete_redis_keys(s),
    )
    for step in steps:
        try:
            step()
        except Exception as exc:  # best effort
            print(f"cleanup of {s.topic_prefix!r} failed: {exc!r}")


def _delete_redis_keys(s: Settings) -> None:
    client = redis.Redis.from_url(s.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{s.redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
