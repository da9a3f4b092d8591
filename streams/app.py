"""The Faust application: one stream processor per pipeline stage, wired by Kafka topics.

`create_app(settings, stages)` builds an app that runs the chosen stages, so one machine can run
them all while a cluster splits them (training stages where the base model fits, cheap stages
anywhere). Each distinct set of stages is its own consumer group; processes with the same set
share its partitions.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faust

from infra.security import faust_credentials
from infra.settings import Settings
from streams.agents import STAGES, add_agents
from workers.pipeline import faults, preflight
from workers.pipeline.context import StageContext


def group_id(settings: Settings, stages: Sequence[str]) -> str:
    """Consumer group (and Faust app id) for a process running `stages`."""
    ordered = [s for s in STAGES if s in stages]
    return f"{settings.app_id}.{'+'.join(ordered)}"


def create_app(
    settings: Settings,
    stages: Sequence[str] = tuple(STAGES),
    ctx: StageContext | None = None,
) -> faust.App:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    preflight.check_base(settings, [STAGES[s] for s in stages])  # before any consumer
    app = faust_app(settings, group_id(settings, stages))
    # One thread for all model work in this process: torch already uses every core for one
    # op, and the event loop must stay free to heartbeat and commit.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastream-ml")
    faults.arm(settings.fault_point)
    add_agents(app, settings, ctx or StageContext.create(settings), list(stages), executor)
    return app


def faust_app(settings: Settings, app_id: str) -> faust.App:
    """The Faust app every stage process runs on (also the ingest benchmark's bare baseline)."""
    datadir = settings.data_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return faust.App(
        app_id,
        broker=f"kafka://{settings.bootstrap_servers.replace(',', ';')}",
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        # Topics are created up front by `lorastream infra up`; Faust's leader topic is not
        # needed (no tables, no leader-only timers), so it is never declared.
        topic_disable_leader=True,
        topic_partitions=settings.partitions,
        web_enabled=False,
        # Faust keeps per-app state in a directory ("{id}-data" in the working directory by
        # default); under the git-ignored data directory it never litters a checkout.
        datadir=str(datadir / "{conf.name}"),
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=1.0,
        producer_acks=-1,
        broker_credentials=faust_credentials(settings),
    )


def topic(app: faust.App, settings: Settings, name: str) -> faust.TopicT:
    return app.topic(
        settings.topic(name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )


def run_worker(settings: Settings, stages: Sequence[str], loglevel: str = "WARNING") -> None:
    """Check what the stages need, then run them until SIGINT/SIGTERM (Faust commits offsets
    on the way out). A misconfigured worker exits with one message before consuming."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    preflight.require(settings, [STAGES[s] for s in stages])
    app = create_app(settings, stages)
    worker = faust.Worker(app, loglevel=loglevel, redirect_stdouts=False)
    # torch, transformers and the stages' state are ~400k long-lived objects that every full
    # cyclic collection would walk again (~0.2 s each) while the stream allocates per event:
    # what start-up built stays for the life of the process, so the collector skips it.
    gc.freeze()
    worker.execute_from_commandline()
