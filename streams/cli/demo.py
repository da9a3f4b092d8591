"""The main job: three policies with different preferences trained end to end, then a table.

Everything is real: the Kafka broker and Redis (started if needed), a Faust worker process
running every stage, a tiny Llama-style base built locally. The demo runs on its own topics,
consumer group and key prefix, so it never mixes with earlier runs or a running pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

from infra.process import stop_child
from infra.settings import Settings, settings_env
from schemas.events import InteractionLogged
from streams.sdk.follow import PipelineFollower

TIMEOUT_S = 540.0
HELDOUT = 8
"""Held-out prompts per policy: split into a selection set (the promotion gate) and a test set
(the reported reward), `workers.pipeline.state.split_heldout`."""
WORDS = ["cat", "sun", "map", "key", "red", "box", "sky", "tea", "owl", "pen", "ice", "jam"]

POLICIES: dict[str, dict] = {
    "terse": {"task": "length", "task_params": {"target_chars": 0}},
    "yes": {"task": "reference", "reference": "yes yes"},
    "fan": {"task": "feedback", "response": "ZZZZZ", "feedback": 1.0},
}
PREFERS = {
    "terse": "short answers (length)",
    "yes": "answers like 'yes yes' (reference)",
    "fan": "what the user liked: 'ZZZZZ' (feedback)",
}


def _prompt(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} {i}?"


def demo_interactions(steps: int) -> list[InteractionLogged]:
    """Held-out prompts first, then training prompts round-robin over the policies."""
    out = [
        InteractionLogged(policy_id=p, prompt=_prompt(1000 + i), split="eval", **spec)
        for p, spec in POLICIES.items()
        for i in range(HELDOUT)
    ]
    out += [
        InteractionLogged(policy_id=p, prompt=_prompt(i), **spec)
        for i in range(steps)
        for p, spec in POLICIES.items()
    ]
    return out


def demo_settings(settings: Settings, base: Path) -> Settings:
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}{run}.",
            "app_id": f"{settings.app_id}-{run}",
            "redis_prefix": f"{settings.redis_prefix}{run}:",
            "artifact_dir": settings.data_dir / "demo" / run / "artifacts",
            "base_model": base,
            "partitions": 3,
        }
    )


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    """The pipeline runs in its own process, exactly as `lorastream worker` would."""
    env = {**os.environ, **settings_env(settings)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--stages", "all"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    stop_child(proc, timeout)


def run_demo(settings: Settings, *, steps: int, as_json: bool, keep: bool,
             objective: str = "grpo") -> int:
    from infra.admin import create_topics, delete_topics
    from infra.services import ensure_kafka, ensure_redis
    from infra.topics import topic_names
    from streams.sdk.producer import InteractionProducer
    from workers.models.base import build_tiny_model

    started = time.monotonic()
    say = _progress_printer(started)
    say("starting Kafka and Redis if needed")
    ensure_redis(settings)
    ensure_kafka(settings)
    say("building the tiny base model (once)")
    base = build_tiny_model(settings.data_dir / "models" / "tiny-llama")
    run = demo_settings(settings, base)
    create_topics(run)
    interactions, prefers = demo_interactions(steps), PREFERS
    if objective != "grpo":  # `streams/cli/demo_objectives.py`
        from streams.cli import demo_objectives as by

        say(f"creating three {objective} policies (their own objective, rank, lr)")
        by.create_policies(run, objective)
        interactions = by.objective_interactions(objective, steps, HELDOUT, _prompt)
        prefers = by.PREFERS[objective]
    log_path = run.artifacts.parent / "worker.log"
    say(f"starting the pipeline worker (log: {log_path})")
    proc = start_worker(run, log_path)
    try:
        with InteractionProducer(run) as producer:
            for event in interactions:
                producer.send(event)
        say(f"pushed {len(interactions)} interaction logs for {len(POLICIES)} policies")
        follower = PipelineFollower(run, list(POLICIES), interactions=steps)
        ok = follower.follow(TIMEOUT_S, on_progress=say, alive=lambda: proc.poll() is None)
    finally:
        stop_worker(proc)
        if not keep:
            delete_topics(run, topic_names(run))
    summary = follower.summary(time.monotonic() - started)
    print(follower.table(prefers))
    if as_json:
        print(orjson.dumps(summary).decode())
    if not ok:
        print(f"demo did not complete; see {log_path}", file=sys.stderr)
        return 1
    return 0


def _progress_printer(started: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say
