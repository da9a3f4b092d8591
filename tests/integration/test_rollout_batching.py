"""The rollout stage answers the interactions of many policies with ONE engine call per unit.

Two levels, both with real Redis and the real tiny model:

- the rollout agent's runner (Faust test context, in-memory sink and dead letters, as in
  test_agents): the /generate calls are counted, and the in-flight throttle is driven by hand;
- a real worker process on the real broker, sampling from an engine this test serves (so the
  test can read the engine's batch counters).

Three of the four policies sample from exported adapters, one from the base, so a unit mixes
adapters in one call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from faust.types import AgentT

from infra.settings import Settings
from schemas import DeadLetter, InteractionLogged, RolloutGenerated, decode_event
from schemas.codec import encode_event
from streams.runner.runner import Received, StageRunner
from tests.support.adapters import make_adapter, stored_revision
from tests.support.catalog import record
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.serving import Calls
from tests.support.stages import all_of, in_process_stage
from tests.support.waiting import wait_for, wait_for_async
from workers.artifacts.store import ArtifactStore
from workers.catalog.writer import Catalog
from workers.pipeline.context import StageContext
from workers.pipeline.rollout import rollout
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.server import ServerThread

pytestmark = pytest.mark.run_settings(group_size=2, max_new_tokens=4, max_in_flight=2)

POLICIES = ["p0", "p1", "p2", "base"]
"""p0..p2 sample from exported revisions (adapters), `base` from the bare base."""
TOKEN = "rollout-batching-token"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("batching-adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture
def seeded(run: Settings, adapter_dirs: list[Path], catalog: Catalog) -> Settings:
    """`run` (small groups) where p0..p2 have exported heads (r1..r3) in the catalog and the
    artifact store."""
    store = ArtifactStore(run.artifacts)
    for i, path in enumerate(adapter_dirs):
        sha = stored_revision(store, path, i + 1).sha256
        for step in range(1, i + 2):
            record(catalog, f"p{i}", str(sha), step)
    return run


def _train(policy: str, i: int, task: str = "length") -> InteractionLogged:
    return InteractionLogged(policy_id=policy, prompt=f"q{i}" + "?" * (i % 3), task=task,
                             task_params={"target_chars": 0})


@pytest.fixture
def rollout_agent(seeded: Settings, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[tuple[AgentT, StageRunner, Calls]]:
    agent, runner = in_process_stage(seeded, "rollout")
    calls = Calls(runner.ctx.engine.client, monkeypatch)  # starts the embedded engine
    yield agent, runner, calls
    runner.ctx.close()


async def test_a_batch_of_four_policies_is_one_engine_call_and_a_poison_fails_alone(
        rollout_agent: tuple[AgentT, StageRunner, Calls]) -> None:
    agent, runner, calls = rollout_agent
    ctx: StageContext = runner.ctx
    train = [_train(p, i) for i in range(2) for p in POLICIES]  # 2 per policy: within room
    poison = _train("p1", 9, task="no-such-reward")
    events = [*train[:3], poison, *train[3:]]
    batch = [Received(encode_event(e), "interactions", 0, k) for k, e in enumerate(events)]
    sink, dlq = runner.sink.__aiter__(), runner.dead_letters.__aiter__()
    async with agent.test_context():
        sent = all_of(RolloutGenerated, await asyncio.wait_for(runner.process_many(batch), 120))
        got = [decode_event(RolloutGenerated, (await sink.get(timeout=10)).value) for _ in sent]
        letter = decode_event(DeadLetter, (await dlq.get(timeout=10)).value)
        assert await runner.process_many(batch) == []  # redelivered: seen, and poison again
        again = decode_event(DeadLetter, (await dlq.get(timeout=10)).value)
    assert calls.n == 1 < len(train)  # before: one call per interaction
    assert set(calls.lora_paths[0]) == {"p0@1", "p1@2", "p2@3", None}
    assert ctx._embedded is not None and ctx._embedded.server.engine.max_adapters_in_a_batch == 4
    assert [r.interaction.event_id for r in sent] == [e.event_id for e in train]
    assert [r.event_id for r in got] == [r.event_id for r in sent]
    assert [r.revision for r in sent] == [1, 2, 3, 0] * 2
    assert (letter.offset, letter.policy_id, again.offset) == (3, "p1", 3)
    assert "unknown reward function 'no-such-reward'" in letter.error
    for policy in POLICIES:  # a slot for each sampled group; the poison took none
        assert ctx.state.in_flight(policy) == 2
    assert ctx.state.in_flight_many([*POLICIES, "never-seen"]) == {
        **dict.fromkeys(POLICIES, 2), "never-seen": 0}
    (alone,) = rollout(ctx, train[1])  # the one-event path: same id, same samples
    assert isinstance(alone, RolloutGenerated)
    assert (alone.event_id, alone.revision) == (sent[1].event_id, sent[1].revision)
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in sent[1].completions]


async def test_a_policy_at_its_in_flight_limit_waits_for_its_trainer_in_a_later_unit(
        rollout_agent: tuple[AgentT, StageRunner, Calls]) -> None:
    """max_in_flight=2: p0's third interaction is not sampled with the first unit; it goes in
    a unit of its own once the trainer has consumed one of p0's groups. The other policies are
    not held back by p0."""
    agent, runner, calls = rollout_agent
    state = runner.ctx.state
    events = [_train("p0", 0), _train("p1", 1), _train("p0", 2), _train("p0", 3),
              _train("base", 4)]
    batch = [Received(encode_event(e), "interactions", 0, k) for k, e in enumerate(events)]
    async with agent.test_context():
        task = asyncio.ensure_future(runner.process_many(batch))
        await wait_for_async(lambda: task.done() or (calls.n == 1 and state.in_flight("p0") == 2),
                     120, "the first unit sampled")
        assert not task.done() and calls.n == 1  # p0's third waits for its trainer
        assert (state.in_flight("p1"), state.in_flight("base")) == (1, 1)
        state.note_trained("p0")  # the trainer consumes one of p0's groups
        sent = all_of(RolloutGenerated, await asyncio.wait_for(task, 120))
    assert calls.n == 2
    assert [r.interaction.event_id for r in sent] == [events[k].event_id for k in (0, 1, 2, 4, 3)]
    assert state.in_flight("p0") == 2


@pytest.fixture
def engine(tiny_model_dir: Path) -> Iterator[ServerThread]:
    config = EngineConfig(base_path=tiny_model_dir, max_lora_rank=8, max_loaded_loras=8)
    server = ServerThread(CpuEngine(config), admin_token=TOKEN).start()
    yield server
    server.stop()


def test_a_worker_on_the_broker_answers_many_policies_in_few_engine_batches(
        seeded: Settings, engine: ServerThread, tmp_path: Path) -> None:
    """All interactions are on the topic before the worker starts (under one key, so in one
    partition and one fetch); each gets exactly one rollout, in far fewer engine batches."""
    run = seeded.model_copy(update={"engine_url": engine.url, "engine_admin_token": TOKEN})
    train = [_train(p, i) for i in range(2) for p in POLICIES]
    poison = _train("p2", 9, task="no-such-reward")
    produce_raw(run, "interactions", [(b"k", encode_event(e)) for e in [poison, *train]])
    log = tmp_path / "worker.log"
    proc = start_worker(run, "rollout", log)
    try:
        rollouts = wait_for(lambda: len(r := read_topic(run, "rollouts", 0.5)) >= len(train) and r,
                            240, interval=0.5, message="a rollout for every interaction")
        letters = wait_for(lambda: read_topic(run, "dead-letters"), 60, message="the poison")
    finally:
        stop_process(proc, log)
    answered = Counter(r["interaction"]["event_id"] for r in rollouts)
    assert answered == Counter(e.event_id for e in train)  # exactly one each
    assert [(d["policy_id"], d["offset"]) for d in letters] == [("p2", 0)]
    batches = engine.engine.batches
    print(f"{len(train)} interactions of {len(POLICIES)} policies: {batches} engine batch(es)")
    assert 1 <= batches < len(train), batches
    assert engine.engine.max_adapters_in_a_batch >= 3
