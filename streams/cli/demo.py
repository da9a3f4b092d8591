"""The main job: three policies with different preferences trained end to end, then a table.

Everything is real: the Kafka broker and Redis (started if needed), a Faust worker process
running every stage, a base built locally: a tiny random model of any registry family
(`--arch`, Llama by default; `deepseek_v3` is MLA + routed and shared experts), or the
pretrained SmolLM2-135M-Instruct (`--model smollm2`), whose demo ends with held-out answers a
person can read (`streams/cli/demo_specs.py`). The demo runs on its own topics, consumer group
and key prefix, so it never mixes with earlier runs or a running pipeline.
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
from streams.cli.demo_specs import DemoSpec, tiny_spec
from streams.sdk.follow import PipelineFollower

TIMEOUT_S = 540.0
HELDOUT = 8
"""Held-out prompts per policy: split into a selection set (the promotion gate) and a test set
(the reported reward), `workers.pipeline.state.split_heldout`."""


def demo_interactions(steps: int, spec: DemoSpec | None = None) -> list[InteractionLogged]:
    """Held-out prompts first, then training prompts round-robin over the policies."""
    spec = spec or tiny_spec("llama")
    out = [
        InteractionLogged(policy_id=p, prompt=spec.heldout(i), split="eval", **task)
        for p, task in spec.policies.items()
        for i in range(HELDOUT)
    ]
    out += [
        InteractionLogged(policy_id=p, prompt=spec.prompt(i), **task)
        for i in range(steps)
        for p, task in spec.policies.items()
    ]
    return out


def demo_settings(settings: Settings, base: Path, spec: DemoSpec | None = None) -> Settings:
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return settings.model_copy(
        update={
            **(spec.settings if spec else {}),
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


def run_demo(settings: Settings, *, steps: int | None, as_json: bool, keep: bool,
             spec: DemoSpec | None = None, objective: str = "grpo") -> int:
    from infra.admin import create_topics, delete_topics
    from infra.services import ensure_kafka, ensure_redis
    from infra.topics import topic_names
    from streams.sdk.producer import InteractionProducer

    spec = spec or tiny_spec("llama")
    steps = spec.steps if steps is None else steps
    started = time.monotonic()
    say = _progress_printer(started)
    say("starting Kafka and Redis if needed")
    ensure_redis(settings)
    ensure_kafka(settings)
    say(f"building the {spec.name} base model (once)")
    base = spec.build(settings.data_dir / "models")
    run = demo_settings(settings, base, spec)
    create_topics(run)
    interactions, prefers = demo_interactions(steps, spec), spec.prefers
    if objective != "grpo":  # `streams/cli/demo_objectives.py`
        from streams.cli import demo_objectives as by

        say(f"creating three {objective} policies (their own objective, rank, lr)")
        by.create_policies(run, objective)
        interactions = by.objective_interactions(objective, steps, HELDOUT, spec.prompt,
                                                 spec.heldout)
        prefers = by.PREFERS[objective]
    log_path = run.artifacts.parent / "worker.log"
    say(f"starting the pipeline worker (log: {log_path})")
    proc = start_worker(run, log_path)
    try:
        with InteractionProducer(run) as producer:
            for event in interactions:
                producer.send(event)
        say(f"pushed {len(interactions)} interaction logs for {len(spec.policies)} policies")
        follower = PipelineFollower(run, list(spec.policies), interactions=steps)
        ok = follower.follow(TIMEOUT_S, on_progress=say, alive=lambda: proc.poll() is None)
    finally:
        stop_worker(proc)
        if not keep:
            delete_topics(run, topic_names(run))
    summary = follower.summary(time.monotonic() - started)
    summary["base"] = spec.name
    print(follower.table(prefers))
    if spec.answers:
        say("answering one held-out prompt with the base and each serving revision")
        answers = heldout_answers(run, base, follower, spec.heldout(0))
        print(answers_table(spec.heldout(0), answers))
        summary["answers"] = {"prompt": spec.heldout(0), **{
            p: {"before": b, "after": a} for p, (b, a) in answers.items()}}
        summary["seconds"] = round(time.monotonic() - started, 1)
    if as_json:
        print(orjson.dumps(summary).decode())
    if not ok:
        print(f"demo did not complete; see {log_path}", file=sys.stderr)
        return 1
    return 0


def heldout_answers(run: Settings, base: Path, follower: PipelineFollower,
                    prompt: str) -> dict[str, tuple[str, str]]:
    """Each policy's greedy answer to `prompt` from the base and from its serving revision,
    prompted as the pipeline prompts (chat template) and decoded as it decodes."""
    from workers.models.chat import render_prompt
    from workers.models.registry import parse_targets
    from workers.serving.sampler import RowRequest, SlotSampler

    serving = {p: prog.serving_path for p, prog in follower.progress.items()}
    sampler = SlotSampler(base, num_slots=len(serving), max_rank=max(8, run.lora_rank),
                          target_modules=parse_targets(run.lora_targets))
    slots: dict[str, int | None] = {}
    for slot, (policy, path) in enumerate(serving.items()):
        if path is not None:
            sampler.load(slot, Path(path))
        slots[policy] = slot if path is not None else None
    ids = render_prompt(sampler.tokenizer, prompt)
    rows = [RowRequest(ids, None, max_new_tokens=run.max_new_tokens, temperature=0.0)]
    rows += [RowRequest(ids, slots[p], max_new_tokens=run.max_new_tokens, temperature=0.0)
             for p in serving]
    before, *after = sampler.generate(rows)
    text = sampler.decode(before.output_ids)
    return {p: (text, sampler.decode(r.output_ids)) for p, r in zip(serving, after, strict=True)}


def answers_table(prompt: str, answers: dict[str, tuple[str, str]]) -> str:
    width = max(len(p) for p in answers)
    lines = [f"held-out prompt {prompt!r}, greedy answers (base -> serving revision):"]
    for policy, (before, after) in answers.items():
        lines.append(f"  {policy.ljust(width)}  before: {before!r}")
        lines.append(f"  {' ' * width}  after:  {after!r}")
    return "\n".join(lines)


def _progress_printer(started: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say
