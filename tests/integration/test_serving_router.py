"""A promoted revision serves through the router on the CPU engine, against real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import safetensors.torch
from prometheus_client import REGISTRY

from infra.settings import Settings
from tests.support.adapters import make_adapter
from tests.support.catalog import evaluate_and_promote, record
from tests.support.waiting import wait_for_async
from workers.artifacts.store import WEIGHTS_FILE, ArtifactStore, adapter_config
from workers.catalog.writer import Catalog
from workers.models.base import LoraSpec
from workers.serving.assignment import set_pinned
from workers.serving.client import SGLangClient
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.residency import ControllerConfig, Residency, ResidencyController
from workers.serving.router import AdapterLoadFailed, Router, UnknownPolicyError
from workers.serving.server import ServerThread

PARAMS = {"max_new_tokens": 5, "temperature": 0.0}


@pytest.fixture
def engine_url(tiny_model_dir: Path) -> Iterator[str]:
    config = EngineConfig(base_path=tiny_model_dir, max_loaded_loras=8, max_loras_per_batch=2,
                          max_lora_rank=4)
    with ServerThread(CpuEngine(config)) as server:
        yield server.url


def publish(catalog: Catalog, base: Path, tmp: Path, policy: str, revision: int,
            seed: int) -> str:
    """Export a revision into the artifact store and record it, as the export stage does."""
    src = make_adapter(base, tmp / f"{policy}-{revision}", seed=seed, scale=0.5)
    tensors = safetensors.torch.load_file(str(src / WEIGHTS_FILE))
    ref = ArtifactStore(catalog.settings.artifacts).put_adapter(
        tensors, adapter_config(LoraSpec(), str(base)))
    assert record(catalog, policy, ref.sha256, step=revision) == revision
    return ref.sha256


def test_promoted_revision_serves_through_router(settings: Settings, redis_client: redis.Redis,
                                                 tiny_model_dir: Path, engine_url: str,
                                                 tmp_path: Path, catalog: Catalog) -> None:
    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    evaluate_and_promote(catalog, "alice", 1)
    direct = SGLangClient(engine_url)

    async def scenario() -> None:
        stop = asyncio.Event()
        ctl = ResidencyController(settings, ControllerConfig("router-e1", engine_url, capacity=3,
                                                             interval_s=0.05), redis_client)
        task = asyncio.create_task(ctl.run(stop))
        router = Router(settings, redis_client, cold_timeout_s=15.0)
        try:
            (gen,) = await router.generate("alice", "hello", sampling_params=PARAMS)
            (want,) = await asyncio.to_thread(direct.generate, "hello", lora_path="alice@1",
                                              sampling_params=PARAMS)
            assert gen.token_ids == want.token_ids and gen.logprobs == want.logprobs
            (base,) = await asyncio.to_thread(direct.generate, "hello", sampling_params=PARAMS)
            assert gen.logprobs != base.logprobs  # the adapter, not the base, answered

            publish(catalog, tiny_model_dir, tmp_path, "alice", 2, seed=2)
            evaluate_and_promote(catalog, "alice", 2)  # promotion: alias + hot set move together
            await wait_for_async(lambda: _route_name(router, "alice"), 15.0, "alice@2 routed")
            await wait_for_async(lambda: _state(ctl, "alice@1", Residency.EVICTED), 15.0,
                        "alice@1 drained")
            served = {m["id"] for m in await asyncio.to_thread(direct.models)}
            assert "alice@2" in served and "alice@1" not in served
            (new,) = await router.generate("alice", "hello", sampling_params=PARAMS)
            assert new.logprobs != gen.logprobs

            with pytest.raises(UnknownPolicyError, match="mallory"):
                await router.generate("mallory", "hello", sampling_params=PARAMS)
            # Operators see residency in Prometheus: alice@2 active, alice@1 evicted, 2 loads.
            assert _gauge("lorastream_adapters", engine="router-e1", state="active") == 1
            assert _gauge("lorastream_adapters", engine="router-e1", state="evicted") == 1
            assert _gauge("lorastream_cold_loads_total", engine="router-e1") == 2
            assert _gauge("lorastream_hot_set_size", engine="router-e1") == 1
        finally:
            stop.set()
            await task
            await router.close()

    asyncio.run(scenario())


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def _route_name(router: Router, policy: str) -> bool:
    route = await router.route(policy)
    return route.serve_name == f"{policy}@2" and not route.cold


async def _state(ctl: ResidencyController, name: str, want: Residency) -> bool:
    item = ctl.tracked.get(name)
    return item is not None and item.state is want


def test_tampered_artifact_fails_cleanly_and_waves_are_bounded(
        settings: Settings, redis_client: redis.Redis, tiny_model_dir: Path, engine_url: str,
        tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_sha = publish(catalog, tiny_model_dir, tmp_path, "eve", 1, seed=3)
    weights = ArtifactStore(settings.artifacts).adapter_path(bad_sha) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # corrupt at rest
    evaluate_and_promote(catalog, "eve", 1)
    for i in range(6):
        publish(catalog, tiny_model_dir, tmp_path, f"p{i}", 1, seed=10 + i)
        evaluate_and_promote(catalog, f"p{i}", 1)

    async def scenario() -> None:
        stop = asyncio.Event()
        ctl = ResidencyController(settings, ControllerConfig(
            "e1", engine_url, capacity=8, max_concurrent_loads=2, interval_s=0.05),
            redis_client)
        peak = 0
        original = ctl.engine.load_lora_adapter

        async def counting(*args: Any, **kw: Any) -> Any:
            nonlocal peak
            peak = max(peak, sum(t.state is Residency.LOADING for t in ctl.tracked.values()))
            return await original(*args, **kw)

        monkeypatch.setattr(ctl.engine, "load_lora_adapter", counting)
        set_pinned(settings, redis_client, "e1", "p5@1", True)
        task = asyncio.create_task(ctl.run(stop))
        router = Router(settings, redis_client, cold_timeout_s=15.0)
        try:
            with pytest.raises(AdapterLoadFailed, match="sha256"):
                await router.route("eve")
            await wait_for_async(lambda: _state(ctl, "p0@1", Residency.ACTIVE), 15.0, "wave loaded")
            await wait_for_async(lambda: _all_active(ctl, [f"p{i}@1" for i in range(6)]), 15.0,
                                 "wave")
            assert peak <= 2  # the wave was queued, never more than 2 loads at once
            assert ctl.tracked["p5@1"].pinned
        finally:
            stop.set()
            await task
            await router.close()

    asyncio.run(scenario())


async def _all_active(ctl: ResidencyController, names: list[str]) -> bool:
    return all([await _state(ctl, n, Residency.ACTIVE) for n in names])
