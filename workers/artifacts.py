"""Content-addressed local artifact store for adapter-only revisions.

A revision's id is the sha256 of its safetensors bytes, so the same weights always get the same
id, an export retried after a crash is a no-op, and a reader can verify what it loads.
Directories appear by rename only, so a revision is visible only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from workers import faults
from workers.errors import PoisonEventError
from workers.model import LoraSpec

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_POLICY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    path: Path
    size_bytes: int


def adapter_config(lora: LoraSpec, base_model: str) -> dict[str, Any]:
    """The adapter_config.json PEFT (and vLLM/SGLang) need to load an adapter-only revision."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": list(lora.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def serialize_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic bytes: sorted keys, contiguous CPU float32, fixed metadata."""
    ordered = {k: tensors[k].detach().to("cpu", torch.float32).contiguous()
               for k in sorted(tensors)}
    return safetensors.torch.save(ordered, metadata=_METADATA)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """root/adapters/<sha256>/{adapter_model.safetensors, adapter_config.json}, root/staging/."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.adapters = self.root / "adapters"
        self.staging = self.root / "staging"
        self._tmp = self.root / "tmp"
        for d in (self.adapters, self.staging, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    def put_adapter(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> ArtifactRef:
        """Write a revision once; the same tensors give the same ref and no rewrite.

        The id covers the weights only: the config of the first write of those weights wins.
        """
        data = serialize_tensors(tensors)
        sha = hashlib.sha256(data).hexdigest()
        final = self.adapters / sha
        if not (final / CONFIG_FILE).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f"{sha[:12]}.", dir=self._tmp))
            try:
                _write_synced(tmp / WEIGHTS_FILE, data)
                _write_synced(tmp / CONFIG_FILE,
                              json.dumps(config, indent=2, sort_keys=True).encode())
                _fsync_dir(tmp)
                faults.hit("artifact:before_rename")  # test-only crash window
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not (final / CONFIG_FILE).is_file():  # not a lost race: a real error
                        raise
                _fsync_dir(self.adapters)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return ArtifactRef(sha256=sha, path=final, size_bytes=len(data))

    def adapter_path(self, sha256: str) -> Path:
        """The revision's PEFT dir; a malformed id is refused before it touches the filesystem."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise PoisonEventError(f"not a sha256 hex digest: {sha256!r}")
        path = self.adapters / sha256
        if not ((path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()):
            raise FileNotFoundError(f"no adapter {sha256} in {self.adapters}")
        return path

    def verify(self, sha256: str) -> bool:
        """True only if the stored weights still hash to their id (missing -> False)."""
        try:
            path = self.adapter_path(sha256)
        except FileNotFoundError:
            return False
        return _sha256_file(path / WEIGHTS_FILE) == sha256

    def stage(self, policy_id: str, step: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Trainer -> exporter handoff: staging/<policy>/<step>.safetensors, atomically."""
        if not _POLICY.fullmatch(policy_id):
            raise PoisonEventError(f"invalid policy id {policy_id!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise PoisonEventError(f"invalid step {step!r}")
        directory = self.staging / policy_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{step}.safetensors"
        fd, name = tempfile.mkstemp(prefix=f".{step}.", suffix=".tmp", dir=directory)
        os.close(fd)
        tmp = Path(name)
        try:
            _write_synced(tmp, serialize_tensors(tensors))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(directory)
        return path

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(str(path), device="cpu")

    def total_size(self) -> int:
        """Bytes held by all revisions (for retention metrics)."""
        return sum(p.stat().st_size for p in self.adapters.glob("*/*") if p.is_file())
