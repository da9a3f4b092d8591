"""Stage functions driven by hand with known scores (real Redis, real catalog topic): export a
revision from given tensors, evaluate with cached held-out scores, promote through the guards;
and a stage's agent run in-process with channels for its outputs."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TypeVar, cast

import faust
import torch
from faust.types import AgentT
from pydantic import BaseModel

from infra.settings import Settings
from schemas.events import AdapterEvaluated, AdapterExported, PolicyUpdated
from streams.app import create_app
from streams.runner.runner import StageRunner
from workers.pipeline.context import StageContext
from workers.pipeline.evaluate import evaluate
from workers.pipeline.export import export
from workers.pipeline.promote import promote
from workers.pipeline.state import score_key

M = TypeVar("M", bound=BaseModel)


def only(kind: type[M], outputs: Sequence[object]) -> M:
    """The one output of a stage call, checked to be a `kind` (stages return `list[BaseModel]`)."""
    (out,) = outputs
    assert isinstance(out, kind), out
    return out


def all_of(kind: type[M], outputs: Sequence[object]) -> list[M]:
    """A stage call's outputs, each checked to be a `kind`."""
    assert all(isinstance(o, kind) for o in outputs), outputs
    return [o for o in outputs if isinstance(o, kind)]


def export_step(ctx: StageContext, policy: str, step: int) -> AdapterExported:
    staged = ctx.store.stage(policy, step, {"w": torch.full((2, 2), float(step))})
    up = PolicyUpdated(policy_id=policy, step=step, loss=0.0, mean_reward=0.0, tokens=1,
                       checkpoint=str(staged))
    (exported,) = export(ctx, up)
    assert isinstance(exported, AdapterExported)
    return exported


def evaluate_with(ctx: StageContext, exported: AdapterExported,
              scores: dict[int, float]) -> AdapterEvaluated:
    """Evaluate with known held-out scores (cached the way the evaluate stage caches them)."""
    heldout = ctx.state.heldout(exported.policy_id)
    for rev, score in scores.items():
        ctx.state.cache_score(exported.policy_id, score_key(rev, heldout), score)
    (ev,) = evaluate(ctx, exported)
    assert isinstance(ev, AdapterEvaluated)
    return ev


def promote_guarded(ctx: StageContext, ev: AdapterEvaluated) -> list[BaseModel]:
    """What the promote agent does: the stage checks the promotion still beats what serves."""
    return promote(ctx, ev)


def in_process_stage(settings: Settings, stage: str) -> tuple[AgentT, StageRunner]:
    """A stage's Faust agent and its runner, model work on the calling loop, outputs and dead
    letters to in-memory channels (a channel delivers only to subscribers: subscribe before
    anything is sent)."""
    app = create_app(settings, [stage])
    app.finalize()
    agent = app.agents[f"stage.{stage}"]
    fun = agent.fun  # the runner's bound `run` (streams/agents.py)
    assert inspect.ismethod(fun) and isinstance(fun.__self__, StageRunner)
    runner = fun.__self__
    runner.executor = None
    # The runner only sends to its sink and dead letters: an in-memory channel stands in for
    # each topic.
    runner.sink = cast(faust.TopicT, app.channel())
    runner.dead_letters = cast(faust.TopicT, app.channel())
    return agent, runner
