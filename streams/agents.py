"""The pipeline's Faust agents: one per stage, each the shared runner around its stage.

A stage is declared in its own module (`workers/pipeline/<stage>.py`): the topic it reads, the
event it takes, the plain function it calls, the topic it writes, and how it differs from the
others. Here they are put in pipeline order and turned into agents.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

import faust

from infra.settings import Settings
from streams.runner import rebalance
from streams.runner.runner import StageRunner
from workers.pipeline import evaluate, export, promote, reward, rollout, update
from workers.pipeline.context import StageContext
from workers.pipeline.stage import Stage

STAGES: dict[str, Stage[Any]] = {
    s.name: s for s in (rollout.STAGE, reward.STAGE, update.STAGE, export.STAGE, evaluate.STAGE,
                        promote.STAGE)
}


def add_agents(app: faust.App, settings: Settings, ctx: StageContext, names: list[str],
               executor: Executor) -> None:
    """One agent per stage in `names`; dead letters and pause announcements have one topic
    each for the whole process."""
    from streams.app import topic  # app.py imports STAGES from here


    dead_letters = topic(app, settings, "dead-letters")
    control = topic(app, settings, "promotions")
    for name in names:
        stage = STAGES[name]
        runner = StageRunner(stage, ctx, sink=topic(app, settings, stage.writes),
                             dead_letters=dead_letters, executor=executor, control=control)
        app.agent(topic(app, settings, stage.reads), name=f"stage.{name}")(runner.run)
    rebalance.connect(app, settings, ctx, [STAGES[n] for n in names], executor)
