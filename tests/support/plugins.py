"""A reward plugin package installed the way pip installs one: its module and a `.dist-info`
with `entry_points.txt` in a site directory (a temporary one, put on `sys.path` for the test
and taken off afterwards), so `importlib.metadata` finds it exactly as it finds an installed
distribution. Nothing in the shared virtualenv changes."""

from __future__ import annotations

import importlib
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
    """Write the package and its dist-info into `site` (a directory the caller puts on
    sys.path); returns `site`."""
    entries = entries or {"monotone": f"{package}:monotone",
                          "judge-like": f"{package}:judge_like"}
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{package}.py").write_text(PLUGIN_SOURCE)
    info = site / f"{package}-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[lorastream.rewards]\n{lines}\n")
    (info / "RECORD").write_text("")
    importlib.invalidate_caches()
    return site


def uninstall(package: str = "lorastream_test_plugin") -> None:
    sys.modules.pop(package, None)
    importlib.invalidate_caches()
