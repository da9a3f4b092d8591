"""Serving seen from a test: count (and, on demand, refuse) a client's /generate requests, so
a test can tell how many engine calls the stages made."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
