"""Shared helpers for the serving tests: a tiny base model and random, non-zero LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from workers.models.base import LoraSpec, build_tiny_model, load_base_model


@pytest.fixture(scope="module")
def base_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session `tiny_model_dir` when the suite provides it, else a module-local tiny model."""
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        return build_tiny_model(tmp_path_factory.mktemp("serving-base") / "tiny")


def make_adapter(base: Path, out: Path, *, rank: int = 4, seed: int = 0,
                 targets: tuple[str, ...] | None = None, scale: float = 0.3) -> Path:
    """A PEFT adapter dir with random A and B (B is zero at init, which would hide bugs)."""
    model, _ = load_base_model(base)
    spec = LoraSpec(rank=rank, alpha=2.0 * rank)
    if targets is not None:
        spec = LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=targets)
    peft_model = peft.get_peft_model(model, spec.peft_config(model))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    return out
