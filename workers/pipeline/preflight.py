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
        problems += _base_model(settings)
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


def check_base(settings: Settings, stages: Sequence[Stage[Any]]) -> None:
    """`create_app`'s own check (tests and embedders build apps without `run_worker`): a
    configured base that these stages cannot train or serve refuses before any consumer
    exists. No base configured passes: the caller then brings its own context."""
    if settings.base_model is None or not any(BASE_MODEL in s.requires for s in stages):
        return
    problems = _base_model(settings)
    if problems:
        names = ",".join(s.name for s in stages)
        raise Misconfigured(f"worker for {names} cannot start:\n  - " + "\n  - ".join(problems))


def _base_model(settings: Settings) -> list[str]:
    """The base resolves (a directory, or a hub id in the local cache), its architecture is in
    the registry and its LoRA targets select something, its tokenizer loads, and it has
    safetensors weights: otherwise every event would fail later, one dead letter at a time."""
    if settings.base_model is None:
        return ["no base model configured: set LORASTREAM_BASE_MODEL"]
    from workers.models import registry
    from workers.models.base import resolve_base

    try:
        path = resolve_base(settings.base_model)
        registry.check_base(path, settings.lora_targets)
    except (registry.UnsupportedArchitecture, registry.BadTargets) as exc:
        return [str(exc)]
    except (OSError, ValueError) as exc:
        return [f"cannot read base model {settings.base_model}: {exc}"[:500]]
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        return [f"base model {path} has no usable tokenizer: {type(exc).__name__}: {exc}"[:500]]
    if not any(path.glob("*.safetensors")):
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
