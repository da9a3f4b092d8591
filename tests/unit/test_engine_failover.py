"""Sampling fails over between engines: when the engine in use stops answering, the call is a
retryable failure and the retry runs on the next engine (a real CPU engine on loopback; the
dead one is a closed port)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from schemas.errors import RetryableError
from workers.models.base import LoraSpec
from workers.serving.sampling import EmbeddedEngine, EngineSampler


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dead_engine_fails_over_to_the_next(tiny_model_dir: Path) -> None:
    engine = EmbeddedEngine(tiny_model_dir, max_loaded_loras=64, max_lora_rank=8,
                            target_modules=LoraSpec().target_modules)
    try:
        dead = f"http://127.0.0.1:{_closed_port()}"
        sampler = EngineSampler.connect(f"{dead},{engine.url}", tiny_model_dir)
        assert sampler.client.base_url.rstrip("/") == dead
        with pytest.raises(RetryableError, match="engine unreachable"):
            sampler.generate(["hi"], None, n=2, max_new_tokens=2, seed=1)
        (group,) = sampler.generate(["hi"], None, n=2, max_new_tokens=2, seed=1)  # the retry
        assert len(group) == 2 and sampler.client.base_url.rstrip("/") == engine.url
    finally:
        engine.stop()
