"""Rebalances as the stages see them: after every assignment each stage that cares
(`Stage.on_assigned`) is told which partitions of its input topic this worker owns now.

Faust sends `on_partitions_revoked` once the batch in hand is done and its offsets are
committed, and `on_partitions_assigned` before any event of the new assignment is handled;
the hook runs on the model thread, after any model work already queued there. From the start
of a rebalance until the assignment, units do not wait for in-flight room
(`workers.pipeline.units.DRAINING`), so the batch in hand finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import faust

from infra.settings import Settings
from streams.ops import metrics
from workers.pipeline import units
from workers.pipeline.context import StageContext
from workers.pipeline.stage import Stage

log = logging.getLogger(__name__)


def connect(app: faust.App, settings: Settings, ctx: StageContext, stages: Sequence[Stage[Any]],
            executor: Executor) -> None:
    hooked = [s for s in stages if s.on_assigned is not None]
    revoked_at: list[float] = []
    started = app.on_rebalance_start

    def draining() -> None:  # Faust calls this first, on the consumer's thread
        units.DRAINING.set()
        started()

    app.on_rebalance_start = draining  # type: ignore[method-assign]

    async def on_revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        revoked_at[:] = [time.monotonic()]

    async def on_assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        loop = asyncio.get_running_loop()
        for stage in hooked:
            topic = settings.topic(stage.reads)
            owned = {tp.partition for tp in assigned if tp.topic == topic}
            if stage.on_assigned is not None:
                await loop.run_in_executor(executor, stage.on_assigned, ctx, owned)
        units.DRAINING.clear()
        paused = time.monotonic() - revoked_at[0] if revoked_at else 0.0
        metrics.REBALANCES.inc()
        metrics.REBALANCE_SECONDS.set(paused)
        log.warning("rebalance: %d partition(s) assigned after %.2f s without any",
                    len(assigned), paused)

    app.on_partitions_revoked.connect(on_revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]
