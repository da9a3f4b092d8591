"""`lorastream --help` and light subcommands start without torch, transformers or peft.

Importing torch costs seconds on the small machines operators run the CLI from; only the
commands that train, sample or serve need it, so the modules on the CLI's import path load it
in the functions that use it. Checked in a fresh interpreter, since this test process has
torch loaded already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.settings import REPO_ROOT

HEAVY = ("torch", "transformers", "peft")

# Runs the CLI as `python -m streams.cli ARGS` does (its parser, all subcommands registered),
# then reports which heavy packages that loaded.
PROBE = """
import sys
from streams.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["catalog", "--help"], ["worker", "--help"]])
def test_cli_help_does_not_import_torch(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: lorastream" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"
