"""Exactly-once trainer steps across crashes: a per-policy journal of the last step, written
atomically together with the trainer checkpoint it produced.

Why: the update stage's trainer state lives in memory, and the agent marks a step's input events
handled only after its `PolicyUpdated` is sent. A worker killed between "stepped" and "marked"
is redelivered those events; without a journal the restarted trainer either trains them a
second time on top of a checkpoint that already holds them (a step number skipped, groups
trained twice) or has lost steps whose events are already marked (training silently lost).

The journal closes both windows. After every successful step, before its output is sent,
`commit` writes into a fresh directory the trainer checkpoint (adapter + AdamW moments + step)
and `journal.json` (the consumed event ids and the `PolicyUpdated` itself), fsyncs, and renames
the directory to `<root>/<policy>/<step>`: a step is durable entirely or not at all. After a
restart, `restore` loads the newest complete step; a redelivered batch is split by `replay`:
the events the newest step consumed are answered with that step's recorded output (same event
id, same step number: downstream drops it by id), only the others are trained.

Only the newest step per policy can have unmarked events (the agent handles units one after
another and marks each before the next starts), so older steps are pruned (`keep` of them stay).

`workers/pipeline/update.py:update()` makes three calls: `restore_from_journal` (before the legacy
checkpoint restore), `split_replayed` (before training), `commit_step` (after each policy's
`PolicyUpdated` is built, before it is returned to be sent).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from schemas.events import Event, PolicyUpdated
from workers.artifacts.store import fsync_path

if TYPE_CHECKING:
    from workers.pipeline.context import StageContext

JOURNAL_FILE = "journal.json"
E = TypeVar("E", bound=Event)


class Checkpointable(Protocol):
    """What the journal needs of a trainer (PolicyTrainer and MultiPolicyTrainer have it)."""

    def has_policy(self, policy_id: str) -> bool: ...
    def save_checkpoint(self, policy_id: str, directory: Path) -> None: ...
    def load_checkpoint(self, policy_id: str, directory: Path) -> None: ...


@dataclass(frozen=True)
class JournalEntry:
    step: int
    event_ids: frozenset[str]
    output: PolicyUpdated


class StepJournal:
    """`<root>/<policy>/<step:012d>/` = checkpoint files + journal.json; newest wins."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def _dir(self, policy_id: str) -> Path:
        return self.root / policy_id

    def _steps(self, policy_id: str) -> list[Path]:
        d = self._dir(policy_id)
        if not d.is_dir():
            return []
        done = [p for p in d.iterdir() if p.name.isdigit() and (p / JOURNAL_FILE).is_file()]
        return sorted(done, key=lambda p: int(p.name))

    def latest(self, policy_id: str) -> JournalEntry | None:
        steps = self._steps(policy_id)
        if not steps:
            return None
        raw = json.loads((steps[-1] / JOURNAL_FILE).read_text())
        return JournalEntry(int(raw["step"]), frozenset(raw["event_ids"]),
                            PolicyUpdated.model_validate(raw["output"]))

    def commit(self, policy_id: str, trainer: Checkpointable, output: PolicyUpdated,
               event_ids: Sequence[str]) -> Path:
        """Durably record a step (checkpoint + consumed ids + output) in one rename."""
        parent = self._dir(policy_id)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp.", dir=parent))
        try:
            trainer.save_checkpoint(policy_id, tmp)
            body = {"step": output.step, "event_ids": sorted(event_ids),
                    "output": output.model_dump(mode="json")}
            with open(tmp / JOURNAL_FILE, "wb") as f:
                f.write(json.dumps(body).encode())
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            final = parent / f"{output.step:012d}"
            if final.exists():  # the same step again (a replay that still trained): replace
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune(policy_id)
        return final

    def _prune(self, policy_id: str) -> None:
        for old in self._steps(policy_id)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self._dir(policy_id).glob(".tmp.*"):  # left by a crash mid-commit
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self, policy_id: str, trainer: Checkpointable) -> int | None:
        """Load the newest durable step into the trainer; returns its step (None: none)."""
        steps = self._steps(policy_id)
        if not steps:
            return None
        trainer.load_checkpoint(policy_id, steps[-1])
        return int(steps[-1].name)

    def replay(self, policy_id: str, events: Sequence[E]) -> tuple[PolicyUpdated | None, list[E]]:
        """Split a batch: the newest step's recorded output if it consumed any of these
        events, and the events still to train."""
        entry = self.latest(policy_id)
        if entry is None:
            return None, list(events)
        done = [e for e in events if e.event_id in entry.event_ids]
        fresh = [e for e in events if e.event_id not in entry.event_ids]
        return (entry.output if done else None), fresh


# -- the update stage's three calls ----------------------------------------------------------------
def journal_of(ctx: StageContext) -> StepJournal:
    return StepJournal(ctx.store.root / "journal")


def restore_from_journal(ctx: StageContext, policy_id: str) -> bool:
    """Before a policy's first step in this process: resume from its newest durable step."""
    if ctx.trainer.has_policy(policy_id):
        return True
    return journal_of(ctx).restore(policy_id, ctx.trainer) is not None


def split_replayed(ctx: StageContext, by_policy: dict[str, list[E]]
                   ) -> tuple[list[PolicyUpdated], dict[str, list[E]]]:
    """Answer redelivered events from the journal; return (recorded outputs, still to train)."""
    journal = journal_of(ctx)
    replayed: list[PolicyUpdated] = []
    fresh: dict[str, list[E]] = {}
    for policy, events in by_policy.items():
        output, rest = journal.replay(policy, events)
        if output is not None:
            replayed.append(output)
        if rest:
            fresh[policy] = rest
    return replayed, fresh


def commit_step(ctx: StageContext, output: PolicyUpdated, events: Sequence[Event]) -> None:
    """Make a trained step durable (checkpoint + consumed ids + output) before it is sent."""
    journal_of(ctx).commit(output.policy_id, ctx.trainer, output, [e.event_id for e in events])
