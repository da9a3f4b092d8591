"""What a worker checks before it consumes anything: misconfiguration must stop the process
with one clear message, never turn good events into dead letters.

Each stage says what it needs (`Stage.requires`: the base model, a serving engine); every stage
needs its topics (with the partitions the deployment expects: a policy's events must land on
the partition the stage's rebalance hooks compute) and a writable Redis. All problems are
collected, so one start-up says everything that is wrong.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from infra import admin
from infra.settings import Settings
from workers.pipeline.stage import Stage

EX_CONFIG = 78
"""sysexits' EX_CONFIG: the supervisor does not restart a worker that exits with it."""

BASE_MODEL = "base_model"
ENGINE = "engine"
SHARED_TOPICS = ("dead-letters", "promotions", "catalog")


class Misconfigured(RuntimeError):
    """The worker cannot run its stages as configured; the message lists every problem."""


def check(settings: Settings, stages: Sequence[Stage[Any]]) -> list[str]:
    """Every problem that stops these stages from working as configured (empty: none)."""
    needs = {n for s in stages for n in s.requires}
    problems = _redis(settings) + _topics(settings, stages)
    if BASE_MODEL in needs or (ENGINE in needs and settings.engine_url is None):
        problems += _base_model(settings.base_model)
    if ENGINE in needs and settings.engine_url is not None:
        problems += _engine(settings.engine_url)
    problems += _artifacts(settings)
    return problems


def require(settings: Settings, stages: Sequence[Stage[Any]]) -> None:
    problems = check(settings, stages)
    if problems:
        names = ",".join(s.name for s in stages)
        raise Misconfigured(f"worker for {names} cannot start:\n  - " + "\n  - ".join(problems))


def _redis(settings: Settings) -> list[str]:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    probe = settings.key("preflight", uuid.uuid4().hex)
    try:
        client.set(probe, 1, ex=60)
        client.delete(probe)
        return []
    except redis.RedisError as exc:
        return [f"Redis at {settings.redis_url} is not writable: {exc}"]
    finally:
        client.close()


def _topics(settings: Settings, stages: Sequence[Stage[Any]]) -> list[str]:
    wanted = {s.reads for s in stages} | {s.writes for s in stages} | set(SHARED_TOPICS)
    names = {settings.topic(t): t for t in sorted(wanted)}
    try:
        found = admin.describe_topics(settings, list(names))
    except Exception as exc:
        return [f"Kafka at {settings.bootstrap_servers} does not answer: {exc}"]
    problems = [f"topic {n} is missing (run `lorastream infra up`)" for n in names
                if n not in found]
    expected = settings.partitions
    reads = sorted({settings.topic(s.reads) for s in stages} & set(found))
    problems += [f"topic {n} has {found[n].partitions} partitions, this worker expects "
                 f"{expected} (LORASTREAM_PARTITIONS)"
                 for n in reads if found[n].partitions != expected]
    return problems


def _base_model(path: Path | None) -> list[str]:
    if path is None:
        return ["no base model configured: set LORASTREAM_BASE_MODEL"]
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(str(path))
        AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        return [f"base model {path} cannot be loaded: {type(exc).__name__}: {exc}"[:500]]
    if not any(Path(path).glob("*.safetensors")):
        return [f"base model {path} has no safetensors weights"]
    return []


def _engine(urls: str) -> list[str]:
    """At least one of the engines named answers (a comma-separated list fails over from one
    to the next, so a worker restarted while one engine is down still has work to do)."""
    from workers.serving.client import SGLangClient

    named = [u.strip() for u in urls.split(",") if u.strip()]
    if any(SGLangClient(url, timeout=5).health() for url in named):
        return []
    return [f"no serving engine answers /health: {', '.join(named)} (LORASTREAM_ENGINE_URL)"]


def _artifacts(settings: Settings) -> list[str]:
    try:
        from workers.artifacts.store import ArtifactStore

        ArtifactStore.for_settings(settings)
    except Exception as exc:
        where = settings.artifact_url or settings.artifacts
        return [f"artifact store {where} is not usable: {type(exc).__name__}: {exc}"[:500]]
    return []
