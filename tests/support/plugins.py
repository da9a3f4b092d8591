"""A reward plugin package installed by pip: a tiny setuptools project declaring
`lorastream.rewards` entry points, `pip install --target` into a site directory (a temporary
one, put on `sys.path` for the test and taken off afterwards), so `importlib.metadata` finds it
exactly as it finds a distribution installed in the virtualenv. The shared virtualenv itself
does not change (other developers' processes share it)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

PLUGIN_SOURCE = '''
"""A tiny reward plugin: prefers completions made of one repeated character."""


def monotone(interaction, completion):
    """1 for an empty or single-character-repeated completion, less per distinct char."""
    return 1.0 / len(set(completion)) if completion else 1.0


monotone.version = 3


async def judge_like(interaction, completions):
    return [float(len(c) % 2) for c in completions]


judge_like.version = 1
judge_like.batched = True


def unversioned(interaction, completion):
    return 0.0
'''


def install_plugin(site: Path, *, package: str = "lorastream_test_plugin",
                   entries: dict[str, str] | None = None) -> Path:
    """Build the plugin as a real distribution (a `pyproject.toml` declaring its entry points)
    and `pip install` it into `site`, a directory the caller puts on sys.path; returns `site`.
    pip writes the `.dist-info` itself, so the test sees what a user's install gives."""
    entries = entries or {"monotone": f"{package}:monotone",
                          "judge-like": f"{package}:judge_like"}
    source = site.parent / f"{package}-src"
    source.mkdir(parents=True, exist_ok=True)
    (source / f"{package}.py").write_text(PLUGIN_SOURCE)
    points = "\n".join(f'"{name}" = "{target}"' for name, target in entries.items())
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{package.replace("_", "-")}"\nversion = "0.1.0"\n\n'
        f'[project.entry-points."lorastream.rewards"]\n{points}\n\n'
        f'[tool.setuptools]\npy-modules = ["{package}"]\n')
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=120)
    importlib.invalidate_caches()
    return site


def uninstall(package: str = "lorastream_test_plugin") -> None:
    sys.modules.pop(package, None)
    importlib.invalidate_caches()
