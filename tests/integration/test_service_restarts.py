"""The broker restarted and Redis killed mid-stream, on a private stack (its own KRaft broker and
AOF Redis, so the shared services stay up): the worker recovers by itself and the audit finds
every event processed exactly once by id, nothing lost, every output what a fault-free run
produces (`loadtests/faults.py`, scaled down)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.services import kafka_paths
from infra.settings import Settings
from loadtests.faults import run


def test_broker_restart_and_redis_kill_lose_and_duplicate_nothing(
        infra_settings: Settings, tmp_path: Path) -> None:
    if not kafka_paths(Settings()).libs.is_dir():
        pytest.skip("the Kafka jars are not resolved (run `lorastream infra up` once)")
    result = run(1500, tmp_path / "stack", schedule=((0.3, "broker"), (0.6, "redis"),
                                                     (0.8, "worker")))
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["mismatched"] == 0, result  # the same final outputs as a run without faults
    assert result["dead_lettered"] == 0 and result["faults_injected"] == 3
