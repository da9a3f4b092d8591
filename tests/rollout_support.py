"""Helpers for the rollout-batching tests: count the sampler's /generate calls, and give a
policy an exported head revision made from a PEFT adapter dir."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from workers.artifacts.store import ArtifactStore
from workers.catalog.index import RevisionPointer
from workers.serving.client import SGLangClient, SGLangError


class Calls:
    """Counts (and, when `refuse` says so, refuses) a client's /generate requests."""

    def __init__(self, client: SGLangClient) -> None:
        self.n = 0
        self.lora_paths: list[list[str | None]] = []
        self.refuse: Callable[[list[str | None]], bool] = lambda paths: False
        self._generate = client.generate
        client.generate = self  # type: ignore[method-assign]

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        self.n += 1
        paths = list(kwargs.get("lora_path") or [])
        self.lora_paths.append(paths)
        if self.refuse(paths):
            raise SGLangError(400, "refused by the test")
        return self._generate(prompts, **kwargs)


def stored_revision(store: ArtifactStore, adapter_dir: Path, revision: int) -> RevisionPointer:
    """Put a PEFT adapter dir into the artifact store as a policy's `revision`."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ref = store.put_adapter(load_file(str(adapter_dir / "adapter_model.safetensors")), config)
    return RevisionPointer(revision, sha256=ref.sha256, path=str(ref.path))
