"""Provenance that outlives retention: a revision is followed back to the interaction logs it
was trained on after the `rewards` and `interactions` topics no longer hold them.

Retention is applied the way the broker applies it, by moving each partition's log start past
the records (DeleteRecords; time-based retention waits for the broker's check interval)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from infra.admin import admin_client, client_config
from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import (
    AdapterExported,
    Completion,
    InteractionLogged,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
    SourcePosition,
)
from streams.cli.main import build_parser
from workers.pipeline.context import StageContext
from workers.pipeline.export import export


def _rewarded(i: int) -> RolloutRewarded:
    inter = InteractionLogged(policy_id="p", prompt=f"question {i}?", task="length")
    ro = RolloutGenerated(policy_id="p", interaction=inter, revision=0, prompt_ids=[1, 2],
                          completions=[Completion(text="ab", token_ids=[3], logprobs=[-1.0])],
                          temperature=1.0)
    return RolloutRewarded(policy_id="p", rollout=ro, rewards=[0.5], reward_fn="length")


def _expire(settings: Settings, topics: list[str]) -> None:
    """What retention does once it passes: every partition's log start moves to its end."""
    consumer = KafkaConsumer(**client_config(settings))
    try:
        parts = [TopicPartition(settings.topic(t), p) for t in topics
                 for p in consumer.partitions_for_topic(settings.topic(t)) or ()]
        ends = consumer.end_offsets(parts)
        with admin_client(settings) as admin:
            admin.delete_records({tp: end for tp, end in ends.items() if end > 0})
        assert consumer.beginning_offsets(parts) == ends
    finally:
        consumer.close()


def test_a_revision_leads_back_to_its_interactions_after_retention(
        settings: Settings, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = settings.model_copy(update={"base_model": tiny_model_dir})
    ctx = StageContext.create(run)
    events = [_rewarded(i) for i in range(3)]
    producer = KafkaProducer(**client_config(run), acks="all")
    sent = [producer.send(run.topic("rewards"), key=b"p", value=encode_event(e)).get(30)
            for e in events]
    for e in events:
        producer.send(run.topic("interactions"), key=b"p",
                      value=encode_event(e.rollout.interaction))
    producer.flush(30)
    producer.close(10)

    staged = ctx.store.stage("p", 2, {"w": torch.ones(2, 2)})
    outs = []
    for step, chunk in ((1, [0, 1]), (2, [2])):
        outs += export(ctx, PolicyUpdated(
            policy_id="p", step=step, loss=0.0, mean_reward=0.5, tokens=3,
            rollout_ids=[events[i].rollout.event_id for i in chunk],
            sources=[SourcePosition(topic=sent[i].topic, partition=sent[i].partition,
                                    offset=sent[i].offset) for i in chunk],
            checkpoint=str(staged) if step == 2 else None))
    (out,) = outs
    assert isinstance(out, AdapterExported) and out.revision == 1

    _expire(run, ["rewards", "interactions"])
    capsys.readouterr()
    args = build_parser().parse_args(["trained-on", "p", "1"])  # what `lorastream` runs
    assert args.handler(args, run) == 0
    traced = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(t["event_id"], t["prompt"]) for t in traced] == [
        (e.rollout.interaction.event_id, e.rollout.interaction.prompt) for e in events]
    ctx.catalog.close()
