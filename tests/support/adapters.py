"""LoRA adapters for tests: random, non-zero PEFT adapter dirs, and one put in the artifact
store as a policy's exported revision."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file

from workers.artifacts.store import ArtifactStore
from workers.catalog.entries import RevisionPointer
from workers.models.base import LoraSpec, load_base_model


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


def stored_revision(store: ArtifactStore, adapter_dir: Path, revision: int) -> RevisionPointer:
    """Put a PEFT adapter dir into the artifact store as a policy's `revision`."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ref = store.put_adapter(load_file(str(adapter_dir / "adapter_model.safetensors")), config)
    return RevisionPointer(revision, sha256=ref.sha256, path=str(ref.path))
