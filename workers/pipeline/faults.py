"""Test-only crash points: make the process die (`os._exit(137)`, as SIGKILL would) at a named
place, so crash-safety tests can kill a worker exactly between two effects.

`LORASTREAM_FAULT_POINT=update:after_fn#2` (the `fault_point` setting) arms one point, here
for its second hit; a worker arms it at start (`arm`), code calls `hit(name)` at its crash
windows. Unarmed, `hit` is one comparison. Points: `<stage>:after_fn` (the stage function's
effects are done, nothing was sent), `<stage>:before_mark_seen` (outputs were sent, the input
is not marked handled yet), `artifact:before_rename` (an adapter's files are written to the
temporary directory, not yet renamed into the store).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

EXIT_CODE = 137
_armed: str | None = None
_after = 1
_hits = 0


def arm(point: str | None) -> None:
    """Arm a crash point for this process (None disarms); `name#N` dies at the Nth hit."""
    global _armed, _after, _hits
    name, _, nth = (point or "").partition("#")
    _armed, _after, _hits = name or None, int(nth or 1), 0


def hit(point: str) -> None:
    """Die here, without cleanup, if this point is armed (and this is its Nth hit)."""
    global _hits
    if _armed is None or _armed != point:
        return
    _hits += 1
    if _hits >= _after:
        log.error("fault injection: exiting at %s (hit %d)", point, _hits)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
