"""A policy's resumable trainer state on disk: adapter, AdamW moments, step (safetensors, JSON).

Both trainers (the per-policy peft one and the multi-policy one) write this one format, so a
checkpoint taken by either resumes in either. `trainer_state.json` is written last: its presence
marks a complete checkpoint, and each file is replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from schemas.errors import PoisonEventError
from workers.models.base import LoraSpec

CHECKPOINT_FORMAT = 1


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(directory: Path, *, policy_id: str, step: int, lora: LoraSpec,
         adapter: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         **extra: Any) -> None:
    """Write one policy's checkpoint; `extra` goes into the JSON (keys, shapes: for checks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    moments = {f"{i}.{name}": t.detach().cpu().contiguous()
               for i, state in opt["state"].items() for name, t in state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    meta = {"format": CHECKPOINT_FORMAT, "policy_id": policy_id, "step": step,
            "lora": {"rank": lora.rank, "alpha": lora.alpha,
                     "target_modules": list(lora.target_modules)},
            "param_groups": groups, **extra}
    atomic_write(directory / "adapter.safetensors", safetensors.torch.save(adapter))
    atomic_write(directory / "optimizer.safetensors", safetensors.torch.save(moments))
    atomic_write(directory / "trainer_state.json", json.dumps(meta, indent=1).encode())


@dataclass(frozen=True)
class Checkpoint:
    meta: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def restore_optimizer(self, optimizer: torch.optim.Optimizer,
                          params: list[torch.nn.Parameter]) -> None:
        """Load the saved AdamW moments into a fresh optimizer over `params`, refusing
        parameters of other shapes than the saved ones (a checkpoint without shapes is older
        and taken as is)."""
        shapes = self.meta.get("shapes")
        if shapes is not None and shapes != [list(p.shape) for p in params]:
            raise PoisonEventError("checkpoint has other parameter shapes than this policy")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in self.moments.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        groups = [{**g, "betas": tuple(g["betas"]), "params": list(range(len(params)))}
                  for g in self.meta["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def load(directory: Path, lora: LoraSpec) -> Checkpoint:
    """Read a checkpoint, refusing one written for another format or LoRA configuration."""
    directory = Path(directory)
    meta = json.loads((directory / "trainer_state.json").read_text())
    saved = meta["lora"]
    if (meta.get("format") != CHECKPOINT_FORMAT or saved["rank"] != lora.rank
            or saved["alpha"] != lora.alpha
            or tuple(saved["target_modules"]) != lora.target_modules):
        raise PoisonEventError(f"checkpoint in {directory} does not match this trainer")
    return Checkpoint(meta, safetensors.torch.load_file(directory / "adapter.safetensors"),
                      safetensors.torch.load_file(directory / "optimizer.safetensors"))
