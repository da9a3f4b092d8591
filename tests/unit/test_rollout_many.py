"""The rollout stage samples the interactions of many policies in ONE engine call.

Against the CPU engine on the tiny model (SGLang's HTTP API on a loopback port), no Kafka, no
Redis: the policies' heads come from a stand-in state, their adapters from a real artifact
store. A request's samples in a mixed batch are the ones it gets alone (same per-row seeds);
one bad interaction fails only itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from transformers import AutoTokenizer

from infra.settings import Settings
from schemas.errors import EventFailures, PoisonEventError
from schemas.events import InteractionLogged, RolloutGenerated
from tests.support.adapters import make_adapter, stored_revision
from tests.support.serving import Calls
from tests.support.stages import all_of, only
from workers.artifacts.store import ArtifactStore
from workers.catalog.entries import BASE, RevisionPointer
from workers.catalog.index import CatalogIndex
from workers.pipeline.context import StageContext
from workers.pipeline.rollout import rollout, rollout_many
from workers.pipeline.state import PolicyState
from workers.serving.client import SGLangClient, SGLangError
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.sampling import EngineSampler, Sample, SampleRequest
from workers.serving.server import ServerThread

TOKEN = "rollout-test-token"
LOGPROB_TOL = 1e-4
"""Token ids must match exactly; log-probs only to float rounding: a request's rows sit in a
differently shaped (and differently padded) batch when it shares the call with others."""


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    config = EngineConfig(base_path=tiny_model_dir, max_lora_rank=8, max_loaded_loras=8)
    srv = ServerThread(CpuEngine(config), admin_token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> list[Path]:
    root = tmp_path_factory.mktemp("rollout-adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(2)]


@pytest.fixture
def sampler(server: ServerThread, tiny_model_dir: Path) -> EngineSampler:
    return EngineSampler(SGLangClient(server.url, api_key=TOKEN),
                         AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def _close(a: list[Sample], b: list[Sample]) -> None:
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.finished for s in a] == [s.finished for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprobs == pytest.approx(y.logprobs, abs=LOGPROB_TOL)


def test_generate_many_mixes_adapters_in_one_call_with_the_single_path_samples(
        sampler: EngineSampler, server: ServerThread, adapter_dirs: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for i, path in enumerate(adapter_dirs):
        sampler.ensure_adapter(f"a{i}", path)
    requests = [SampleRequest("Hi", None, 11), SampleRequest("What is 2+2?", "a0", 12),
                SampleRequest("x", "a1", 13), SampleRequest("Hi", "a0", 14)]
    calls = Calls(sampler.client, monkeypatch)
    batches = server.engine.batches
    many = sampler.generate_many(requests, n=3, max_new_tokens=8, temperature=0.9)
    assert calls.n == 1 and calls.lora_paths[0] == [r.adapter for r in requests for _ in "abc"]
    assert server.engine.batches == batches + 1  # one forward batch for all of them
    assert server.engine.max_adapters_in_a_batch >= 3  # base, a0 and a1 together
    assert [len(g) for g in many] == [3, 3, 3, 3]
    for request, group in zip(requests, many, strict=True):
        (alone,) = sampler.generate([request.prompt], request.adapter, n=3, max_new_tokens=8,
                                    temperature=0.9, seed=request.seed)
        _close(group, alone)
    assert many[0] != many[3]  # same prompt, other adapter and seed
    assert sampler.generate_many([], n=3, max_new_tokens=8) == []


class HeadsOnly:
    """The bits of the catalog index and `PolicyState` the rollout stage reads: training heads,
    held-out prompts."""

    def __init__(self, heads: dict[str, RevisionPointer]) -> None:
        self.heads = heads
        self.heldout: list[InteractionLogged] = []

    def head(self, policy_id: str) -> RevisionPointer:
        return self.heads.get(policy_id, BASE)

    def add_heldout(self, interaction: InteractionLogged) -> None:
        self.heldout.append(interaction)


@pytest.fixture
def ctx(sampler: EngineSampler, tiny_model_dir: Path, adapter_dirs: list[Path],
        tmp_path: Path) -> StageContext:
    """alice and bob sample from exported revisions (two adapters), carol from the base."""
    settings = Settings(base_model=tiny_model_dir, artifact_dir=tmp_path / "artifacts",
                        group_size=3, max_new_tokens=6, temperature=0.9)
    store = ArtifactStore(settings.artifacts)
    heads = {"alice": stored_revision(store, adapter_dirs[0], 1),
             "bob": stored_revision(store, adapter_dirs[1], 2)}
    both = HeadsOnly(heads)
    return StageContext(settings=settings, state=cast(PolicyState, both),
                        index=cast(CatalogIndex, both), _engine=sampler, _store=store)


def _stand_in(ctx: StageContext) -> HeadsOnly:
    state = ctx.state
    assert isinstance(state, HeadsOnly)
    return state


def _train(policy: str, i: int, task: str = "length") -> InteractionLogged:
    return InteractionLogged(policy_id=policy, prompt=f"question {i}" + "?" * i, task=task,
                             task_params={"target_chars": 0})


def _same_rollout(a: RolloutGenerated, b: RolloutGenerated) -> None:
    assert (a.event_id, a.policy_id, a.revision, a.prompt_ids, a.temperature) == (
        b.event_id, b.policy_id, b.revision, b.prompt_ids, b.temperature)
    assert a.interaction == b.interaction
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    for x, y in zip(a.completions, b.completions, strict=True):
        assert x.logprobs == pytest.approx(y.logprobs, abs=LOGPROB_TOL)


def test_rollout_many_samples_every_policy_in_one_call_as_the_single_path_does(
        ctx: StageContext, monkeypatch: pytest.MonkeyPatch) -> None:
    train = [_train("alice", 0), _train("bob", 1), _train("carol", 2), _train("alice", 3)]
    held = InteractionLogged(policy_id="bob", prompt="held?", task="length", split="eval")
    calls = Calls(ctx.engine.client, monkeypatch)
    outs = rollout_many(ctx, [train[0], held, *train[1:]])
    assert calls.n == 1
    assert set(calls.lora_paths[0]) == {"alice@1", "bob@2", None}
    rollouts = all_of(RolloutGenerated, outs)
    assert [o.interaction.event_id for o in rollouts] == [i.event_id for i in train]
    assert [o.revision for o in rollouts] == [1, 2, 0, 1]
    assert _stand_in(ctx).heldout == [held]
    for interaction, out in zip(train, rollouts, strict=True):
        alone = only(RolloutGenerated, rollout(ctx, interaction))
        _same_rollout(out, alone)
        assert len(out.completions) == 3
    assert calls.n == 1 + len(train)  # the single path: one call per interaction


def test_a_poison_interaction_fails_alone(ctx: StageContext,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good = [_train("alice", 0), _train("bob", 1), _train("alice", 2)]
    bad = _train("alice", 5, task="no-such-reward")
    calls = Calls(ctx.engine.client, monkeypatch)
    with pytest.raises(EventFailures) as failed:
        rollout_many(ctx, [good[0], bad, *good[1:]])
    assert list(failed.value.failures) == [bad.event_id]
    assert isinstance(failed.value.failures[bad.event_id], PoisonEventError)
    assert "unknown reward function 'no-such-reward'" in str(failed.value.failures[bad.event_id])
    assert [o.interaction.event_id for o in all_of(RolloutGenerated, failed.value.outputs)] == [
        g.event_id for g in good]
    assert calls.n == 1
    with pytest.raises(PoisonEventError):  # alone, the error is raised as is
        rollout(ctx, bad)


def test_a_policy_the_engine_refuses_fails_only_its_own_interactions(
        ctx: StageContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head whose artifact is missing fails its policy at planning; an engine refusal of the mixed
    call is retried per adapter, so only the refused adapter's interactions fail."""
    _stand_in(ctx).heads["dave"] = RevisionPointer(1, sha256="0" * 64, path="/nowhere")
    interactions = [_train("alice", 0), _train("bob", 1), _train("dave", 2), _train("carol", 3),
                    _train("bob", 4)]
    calls = Calls(ctx.engine.client, monkeypatch)
    calls.refuse = lambda paths: "bob@2" in paths
    with pytest.raises(EventFailures) as failed:
        rollout_many(ctx, interactions)
    failures = failed.value.failures
    assert sorted(failures) == sorted(interactions[i].event_id for i in (1, 2, 4))
    assert isinstance(failures[interactions[1].event_id], SGLangError)
    assert isinstance(failures[interactions[2].event_id], FileNotFoundError)  # no artifact
    assert [o.interaction.event_id for o in all_of(RolloutGenerated, failed.value.outputs)] == [
        interactions[0].event_id, interactions[3].event_id]
    assert calls.n == 1 + 3  # the mixed call, then one per adapter (alice, bob, base)
