"""The code standard as a test: ruff and mypy clean on the shipped packages and the tests.

Run here so the README's one test command (and CI) enforces it, not a reviewer's memory.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.settings import REPO_ROOT

PACKAGES = ["streams", "workers", "schemas", "infra", "loadtests", "tests"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff")
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    done = _run("mypy", *PACKAGES)
    assert done.returncode == 0, done.stdout[-4000:]
