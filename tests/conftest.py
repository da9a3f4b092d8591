"""Shared fixtures: the tiny base model is built once per test session (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from workers.models.base import build_tiny_model

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny")
