"""A stage worker freezes what start-up built before it consumes.

torch, transformers and the stages' state are hundreds of thousands of long-lived objects; a
full cyclic collection walking them took ~0.2 s and the rollout worker's per-event CPU fell
from 167.5 to 162.8 µs once they were frozen (docs/performance.md, "Ingest").
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

import streams.app as app_module
from infra.settings import Settings


def test_worker_freezes_startup_objects_before_consuming(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[int] = []

    class Worker:
        def __init__(self, app: Any, **_: Any) -> None:
            pass

        def execute_from_commandline(self) -> None:
            frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(app_module.faust, "Worker", Worker)
    monkeypatch.setattr(app_module.preflight, "require", lambda *_: None)
    monkeypatch.setattr(app_module, "create_app", lambda *_: object())
    gc.unfreeze()
    try:
        app_module.run_worker(Settings(), ["rollout"])
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 1000
