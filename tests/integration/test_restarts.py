"""Restarts on the real broker and Redis: Redis state wiped and rebuilt from the catalog (and
the held-out prompts from the `interactions` topic), and a serving engine killed and brought
back, reloading its assignment by itself.

The "flush" deletes every key of this test's namespace (its Redis prefix), which is what a
FLUSHDB means to one pipeline, without wiping the shared test Redis other suites use.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import safetensors.torch

from infra.process import stop_child
from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import InteractionLogged
from tests.support.adapters import make_adapter
from tests.support.catalog import serve
from tests.support.kafka import produce_raw
from tests.support.processes import free_port, lorastream, start_cli
from tests.support.stages import evaluate_with, export_step, promote_guarded
from tests.support.waiting import wait_for
from workers.artifacts.store import WEIGHTS_FILE, ArtifactStore, adapter_config
from workers.catalog.index import CatalogIndex
from workers.catalog.writer import Catalog
from workers.models.base import LoraSpec
from workers.pipeline import guards, rollout
from workers.pipeline.context import StageContext
from workers.serving.client import SGLangClient, SGLangError

TOKEN = "engine-admin-token"


def _snapshot(ctx: StageContext) -> dict[str, Any]:
    index, entry = ctx.index, ctx.index.get("p")
    assert entry is not None
    return {"head": index.head("p").revision, "serving": index.serving("p").revision,
            "hot": index.hot_set(),
            "revisions": {n: index.revision("p", n).sha256 for n in (1, 2)},
            "heldout": sorted(h.event_id for h in ctx.state.heldout("p")),
            "catalog": (entry.serving, entry.candidate, sorted(entry.revisions))}


def test_redis_flushed_and_rebuilt_from_the_catalog(settings: Settings, run: Settings,
                                                    redis_client: redis.Redis) -> None:
    ctx = StageContext.create(run)
    held = [InteractionLogged(policy_id="p", prompt=f"held {i}?", split="eval") for i in range(3)]
    train = InteractionLogged(policy_id="p", prompt="train?")
    produce_raw(settings, "interactions", [(b"p", encode_event(e)) for e in [*held, train]]
                + [(b"p", b"{not json")])
    rollout.store_heldout(ctx, held, [encode_event(e) for e in held])  # as the stage does
    r1, r2 = export_step(ctx, "p", 2), export_step(ctx, "p", 4)
    assert len(promote_guarded(ctx, evaluate_with(ctx, r1, {0: 0.1, 1: 0.5}))) == 1
    before = _snapshot(ctx)
    assert before["head"] == 2 and before["serving"] == 1 and before["hot"] == ["p@1"]
    assert len(before["heldout"]) == 3

    keys = list(redis_client.scan_iter(match=f"{settings.redis_prefix}*"))
    redis_client.delete(*keys)  # the namespace's FLUSHDB
    assert ctx.index.head("p").revision == 0 and CatalogIndex(settings).get("p") is None

    done = lorastream(settings, "catalog", "rebuild", "--json")
    assert done.returncode == 0, done.stderr
    assert _snapshot(ctx) == before  # held-out prompts too: replayed from `interactions`
    r3 = export_step(ctx, "p", 6)  # numbering continues without a gap or a reuse
    assert r3.revision == 3 and ctx.index.head("p").revision == 3
    del r2
    ctx.catalog.close()


@pytest.fixture
def served(run: Settings, tiny_model_dir: Path, tmp_path: Path, catalog: Catalog) -> Settings:
    """alice@1 in the artifact store, recorded, serving: the hot set an engine must hold
    (`run` carries the engine admin token its test marks)."""
    src = make_adapter(tiny_model_dir, tmp_path / "alice-1", seed=1, scale=0.5)
    tensors = safetensors.torch.load_file(str(src / WEIGHTS_FILE))
    ref = ArtifactStore(run.artifacts).put_adapter(
        tensors, adapter_config(LoraSpec(), str(tiny_model_dir)))
    serve(catalog, "alice", ref.sha256)
    return run


def _start_engine(run: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    return start_cli(run, log, "engine", "--port", str(port), "--engine-id", "e1",
                     "--max-lora-rank", "4", "--max-loaded-loras", "4")


def _loaded(url: str) -> set[str]:
    try:
        return {m["id"] for m in SGLangClient(url, timeout=2).models()}
    except OSError:
        return set()


@pytest.fixture
def engine_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "engine.log"
    yield log
    if log.exists():
        print(log.read_text(errors="replace")[-3000:])


@pytest.mark.run_settings(engine_admin_token=TOKEN)
def test_killed_engine_comes_back_with_its_assignment(served: Settings, engine_log: Path) -> None:
    engine_port = free_port()
    url = f"http://127.0.0.1:{engine_port}"
    proc = _start_engine(served, engine_port, engine_log)
    try:
        wait_for(lambda: "alice@1" in _loaded(url), 120, interval=0.2,
                 message="the engine loaded its share of the hot set")
        with pytest.raises(SGLangError) as refused:
            SGLangClient(url).unload_lora_adapter("alice@1")  # no token: refused
        assert refused.value.status == 401
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert _loaded(url) == set()
        proc = _start_engine(served, engine_port, engine_log)
        wait_for(lambda: "alice@1" in _loaded(url), 120, interval=0.2,
                 message="the restarted engine reloaded alice@1 by itself")
        (out,) = SGLangClient(url).generate("hi", lora_path="alice@1",
                                            sampling_params={"max_new_tokens": 2})
        assert out.text is not None
    finally:
        stop_child(proc)


def test_pauses_and_resumes_survive_a_flush(settings: Settings, run: Settings,
                                            redis_client: redis.Redis) -> None:
    """A paused policy must stay paused when Redis is lost (its adapter diverged), and one an
    operator resumed must stay resumed: the rebuild replays both from `promotions`."""
    ctx = StageContext.create(run)
    for policy in ("a", "b"):
        paused = guards.pause(ctx, policy, "update", "non-finite loss")
        assert paused is not None
        ctx.catalog.announce(paused)  # what the guarded update agent sends
    resumed = lorastream(settings, "resume", "b")
    assert resumed.returncode == 0, resumed.stderr
    keys = list(redis_client.scan_iter(match=f"{settings.redis_prefix}*"))
    redis_client.delete(*keys)
    assert guards.paused_policies(ctx) == []

    done = lorastream(settings, "catalog", "rebuild", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["paused"] == 1
    assert guards.paused_policies(ctx) == [
        {"policy_id": "a", "stage": "update", "reason": "non-finite loss"}]
    ctx.catalog.close()
