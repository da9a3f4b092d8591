"""Data contracts and operations on the real broker and Redis: an event without an id dedups on
redelivery, an unsupported schema version is dead-lettered with the reason, a misconfigured
worker refuses to start instead of dead-lettering, and dead letters are listed and replayed
(idempotently) once their cause is fixed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from infra.admin import client_config
from infra.settings import Settings
from schemas.codec import decode_event, encode_event
from schemas.events import Completion, DeadLetter, InteractionLogged, RolloutGenerated
from schemas.ids import record_id
from streams.app import group_id
from streams.cli.main import build_parser
from streams.runner.runner import Received
from tests.support.kafka import drained, produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.stages import in_process_stage
from tests.support.waiting import wait_for
from workers.pipeline import guards
from workers.pipeline.context import StageContext


def _rollout_without_id(i: int) -> bytes:
    inter = InteractionLogged(policy_id="alice", prompt=f"q{i}?", task="length")
    ro = RolloutGenerated(policy_id="alice", interaction=inter, revision=0, prompt_ids=[1],
                          completions=[Completion(text="ab", token_ids=[3, 4],
                                                  logprobs=[-1.0, -1.0])], temperature=1.0)
    data = orjson.loads(encode_event(ro))
    del data["event_id"]  # as a producer in another language may send it
    return orjson.dumps(data)


def _records(settings: Settings, topic: str) -> list[Received]:
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    name = settings.topic(topic)
    parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    out: list[Received] = []
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for recs in consumer.poll(timeout_ms=500).values():
            out += [Received(r.value, r.topic, r.partition, r.offset) for r in recs]
    consumer.close()
    return sorted(out, key=lambda r: (r.partition or 0, r.offset or 0))


async def test_an_event_without_an_id_is_handled_once_however_often_it_comes(
        settings: Settings) -> None:
    produce_raw(settings, "rollouts", [(b"alice", _rollout_without_id(i)) for i in range(2)]
                + [(b"alice", orjson.dumps({**orjson.loads(_rollout_without_id(9)),
                                             "schema_version": 999}))])
    first, second, future = _records(settings, "rollouts")
    agent, runner = in_process_stage(settings, "reward")
    dlq = runner.dead_letters.__aiter__()
    async with agent.test_context():
        out = await runner.process_many([first, second, future])
        again = await runner.process_many([first])  # Kafka redelivers the same record
        letter = decode_event(DeadLetter, (await dlq.get(timeout=10)).value)
        replayed = Received(first.raw, first.topic, first.partition, 99,
                            first_read=first.origin)  # a replay: new offset, origin header
        assert await runner.process_many([replayed]) == []
    assert [o.rollout.event_id for o in out] == [  # type: ignore[attr-defined]
        record_id(*first.origin), record_id(*second.origin)]  # type: ignore[misc]
    assert again == []
    assert "unsupported schema_version 999" in letter.error and letter.offset == future.offset


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """`lorastream ARGS` in this process (the parser and handler `main` runs; a process per
    call would spend most of the test importing torch)."""

    def run(settings: Settings, *args: str) -> Ran:
        capsys.readouterr()
        parsed = build_parser().parse_args(list(args))
        code = parsed.handler(parsed, settings)
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def test_a_worker_without_a_base_model_refuses_to_start(settings: Settings,
                                                        cli: Callable[..., Ran]) -> None:
    produce_raw(settings, "interactions", [(b"alice", encode_event(
        InteractionLogged(policy_id="alice", prompt="hi?")))])
    done = cli(settings.model_copy(update={"base_model": Path("/nonexistent/model")}),
                "worker", "--stages", "rollout")
    assert done.returncode == 78, done.stderr
    assert "cannot start" in done.stderr and "/nonexistent/model" in done.stderr
    done = cli(settings.model_copy(update={"partitions": 3}), "worker", "--stages", "reward")
    assert done.returncode == 78 and "has 2 partitions, this worker expects 3" in done.stderr
    assert read_topic(settings, "dead-letters", 0.5) == []  # nothing consumed, nothing lost


def test_dead_letters_are_listed_and_replayed_once_the_cause_is_fixed(
        settings: Settings, tiny_model_dir: Path, tmp_path: Path, cli: Callable[..., Ran]) -> None:
    """Rollouts of a paused policy are dead-lettered by the update stage; after the operator
    resumes it, `dead-letters replay` sends them back and they are trained; a second replay
    changes nothing (the stage drops what it handled since)."""
    run = settings.model_copy(update={"base_model": tiny_model_dir, "group_size": 2,
                                      "max_new_tokens": 4, "update_batch": 1})
    ctx = StageContext.create(run)
    guards.pause(ctx, "bob", "update", "non-finite loss")
    rewarded = []
    for i in range(2):
        inter = InteractionLogged(policy_id="bob", prompt=f"q{i}?", task="length")
        ro = RolloutGenerated(policy_id="bob", interaction=inter, revision=0, prompt_ids=[5, 6],
                              completions=[Completion(text="a", token_ids=[7], logprobs=[-1.0]),
                                           Completion(text="b", token_ids=[8], logprobs=[-2.0])],
                              temperature=1.0)
        rewarded.append({**orjson.loads(encode_event(ro)), "kind": "rollout_rewarded",
                         "rollout": orjson.loads(encode_event(ro)), "rewards": [1.0, 0.0],
                         "reward_fn": "length", "event_id": f"rw{i}"})
    produce_raw(run, "rewards", [(b"bob", orjson.dumps(r)) for r in rewarded])
    log = tmp_path / "worker.log"
    worker = start_worker(run, "update", log)
    try:
        group = group_id(run, ["update"])
        wait_for(lambda: drained(run, group, ["rewards"]), 180, 0.5, "update drained")
        listed = cli(run, "dead-letters", "list", "--stage", "update", "--reason", "paused",
                      "--policy", "bob", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert len(rows) == 2 and all(r["error_type"] == "PolicyPausedError" for r in rows)
        assert cli(run, "dead-letters", "list", "--stage", "reward").stdout == ""
        assert cli(run, "dead-letters", "list", "--since", "1h", "--json").stdout.count("\n") == 2
        assert cli(run, "resume", "bob").returncode == 0
        for _ in range(2):  # the second replay is a duplicate of the first
            replay = cli(run, "dead-letters", "replay", "--policy", "bob")
            assert replay.returncode == 0 and "replayed 2" in replay.stderr, replay.stderr
            wait_for(lambda: drained(run, group, ["rewards"]), 180, 0.5, "replay drained")
    finally:
        stop_process(worker, log)
    updates = [u for u in read_topic(run, "updates", 0.5) if u.get("kind") == "policy_updated"]
    assert sorted(u["step"] for u in updates) == [1, 2]
    assert len(read_topic(run, "dead-letters", 0.5)) == 2
    ctx.catalog.close()
