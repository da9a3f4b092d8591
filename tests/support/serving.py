"""Serving seen from a test: count (and, on demand, refuse) a client's /generate requests, so
a test can tell how many engine calls the stages made."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from workers.serving.client import SGLangClient, SGLangError


class Calls:
    """Counts (and, when `refuse` says so, refuses) a client's /generate requests, for the rest
    of the test."""

    def __init__(self, client: SGLangClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        self.lora_paths: list[list[str | None]] = []
        self.refuse: Callable[[list[str | None]], bool] = lambda paths: False
        self._generate = client.generate
        monkeypatch.setattr(client, "generate", self)

    def __call__(self, prompts: Any, **kwargs: Any) -> Any:
        self.n += 1
        paths = list(kwargs.get("lora_path") or [])
        self.lora_paths.append(paths)
        if self.refuse(paths):
            raise SGLangError(400, "refused by the test")
        return self._generate(prompts, **kwargs)
