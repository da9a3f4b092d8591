"""SmolLM2-135M-Instruct for the benchmarks: `workers.models.smollm2`, in `.data/models`."""

from __future__ import annotations

from pathlib import Path

from infra.settings import REPO_ROOT
from workers.models.smollm2 import GGUF_NAME, gguf_path
from workers.models.smollm2 import smollm2_dir as _convert

DEFAULT_DIR = REPO_ROOT / ".data" / "models" / "smollm2-135m"

__all__ = ["DEFAULT_DIR", "GGUF_NAME", "gguf_path", "smollm2_dir"]


def smollm2_dir(out_dir: Path = DEFAULT_DIR) -> Path:
    """The HF-format model dir, converted from the GGUF on first use."""
    return _convert(out_dir)


if __name__ == "__main__":
    print(smollm2_dir())
