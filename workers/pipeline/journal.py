"""Exactly-once trainer steps across crashes and rebalances: a per-policy journal of steps,
each written with the trainer checkpoint it produced, and a fenced head that says which step is
the policy's newest.

Why: the update stage's trainer state lives in memory, and the agent marks a step's input events
handled only after its `PolicyUpdated` is sent. A worker killed between "stepped" and "marked"
is redelivered those events; without a journal the restarted trainer either trains them a
second time or has lost steps whose events are already marked. And with several update
workers, a policy's partition moves between them: a worker that held the policy before must
never step it again from the weights it still has.

A step commits in three moves. (1) The checkpoint (adapter + AdamW moments + step) and
`journal.json` (consumed event ids and the `PolicyUpdated`) are written, fsynced and renamed to
a directory of their own, `<policy>/<step:012d>-<token>`; with a shared copy of the store
(`workers/artifacts/remote.py`) they are put there too, `journal.json` last. (2) The fence: the
policy's head in Redis moves from step N-1 to this entry in one atomic compare-and-set, only if
the head is still at N-1, the step this one was computed from. Two workers that both computed
step N from N-1 cannot both win; the loser removes its entry and is told (`StaleStep`). (3) Old
entries are pruned. A crash before (2) leaves an entry no head names (pruned later); after
(2) the step is durable and a redelivered batch is answered from it by `replay`: the events the
head step consumed get its recorded output (same id, same step: downstream drops it by id).

If Redis lost the head, the newest entry on storage is taken as the head again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import redis

from schemas.errors import RetryableError
from schemas.events import Event, PolicyUpdated
from workers.artifacts.remote import RemoteFiles
from workers.artifacts.store import fsync_path
from workers.keys import RedisKeys

if TYPE_CHECKING:
    from workers.pipeline.context import StageContext

JOURNAL_FILE = "journal.json"
CHECKPOINT_FILES = ("adapter.safetensors", "optimizer.safetensors", "trainer_state.json")
HEAD_FIELD = "journal_head"
E = TypeVar("E", bound=Event)

_ADVANCE = """
local cur = redis.call('HGET', KEYS[1], ARGV[3])
local step = 0
if cur then step = tonumber(string.sub(cur, 1, 12)) end
if step ~= tonumber(ARGV[1]) then return {0, cur or ''} end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[2])
return {1, ARGV[2]}
"""


class StaleStep(RetryableError):
    """A step was computed from a state that is no longer the policy's newest: another worker
    advanced the policy meanwhile. Nothing of it was applied."""


class Checkpointable(Protocol):
    """What the journal needs of a trainer (PolicyTrainer and MultiPolicyTrainer have it)."""

    def has_policy(self, policy_id: str) -> bool: ...
    def save_checkpoint(self, policy_id: str, directory: Path) -> None: ...
    def load_checkpoint(self, policy_id: str, directory: Path) -> None: ...


class Heads(Protocol):
    """Where each policy's newest committed entry is named, with a compare-and-set."""

    def get(self, policy_id: str) -> str | None: ...
    def advance(self, policy_id: str, from_step: int, entry: str) -> tuple[bool, str | None]: ...
    def seed(self, policy_id: str, entry: str) -> None: ...


class RedisHeads:
    """Heads in the policy's Redis hash (`policy:<id>` field `journal_head`), shared by every
    worker; the compare-and-set is one Lua script."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.r, self.keys = client, keys
        self._advance = client.register_script(_ADVANCE)

    def get(self, policy_id: str) -> str | None:
        raw = self.r.hget(self.keys.policy(policy_id), HEAD_FIELD)
        return raw.decode() if isinstance(raw, bytes) else raw

    def get_many(self, policy_ids: Sequence[str]) -> dict[str, str | None]:
        pipe = self.r.pipeline(transaction=False)
        for p in policy_ids:
            pipe.hget(self.keys.policy(p), HEAD_FIELD)
        return {p: (v.decode() if isinstance(v, bytes) else v)
                for p, v in zip(policy_ids, pipe.execute(), strict=True)}

    def advance(self, policy_id: str, from_step: int, entry: str) -> tuple[bool, str | None]:
        ok, cur = self._advance(keys=[self.keys.policy(policy_id)],
                                args=[from_step, entry, HEAD_FIELD])
        cur = cur.decode() if isinstance(cur, bytes) else cur
        return bool(ok), (cur or None)

    def seed(self, policy_id: str, entry: str) -> None:
        self.r.hsetnx(self.keys.policy(policy_id), HEAD_FIELD, entry)


def step_of(entry: str | None) -> int:
    """The step an entry name records (0: no entry)."""
    return int(entry.split("-", 1)[0]) if entry else 0


@dataclass(frozen=True)
class JournalEntry:
    step: int
    event_ids: frozenset[str]
    output: PolicyUpdated


class StepJournal:
    """`<root>/<policy>/<step:012d>-<token>/` = checkpoint files + journal.json; the head names
    the policy's newest. `remote` (a shared copy) holds the same under `journal/`."""

    def __init__(self, root: Path, heads: Heads, keep: int = 2,
                 remote: RemoteFiles | None = None) -> None:
        self.root = Path(root)
        self.heads = heads
        self.keep = max(1, keep)
        self.remote = remote

    def _dir(self, policy_id: str) -> Path:
        return self.root / policy_id

    def _key(self, policy_id: str, entry: str = "") -> str:
        return f"journal/{policy_id}/{entry}".rstrip("/")

    def _entries(self, policy_id: str) -> list[str]:
        """Complete entries on storage (local and shared), oldest step first."""
        d = self._dir(policy_id)
        names = {p.name for p in d.iterdir() if _is_entry(p.name) and (p / JOURNAL_FILE).is_file()
                 } if d.is_dir() else set()
        if self.remote is not None:
            names |= {n for n in self.remote.children(self._key(policy_id)) if _is_entry(n)
                      and self.remote.exists(f"{self._key(policy_id, n)}/{JOURNAL_FILE}")}
        return sorted(names, key=step_of)

    def head(self, policy_id: str) -> str | None:
        """The newest committed entry (re-seeded from storage if Redis lost it)."""
        entry = self.heads.get(policy_id)
        if entry is None:
            found = self._entries(policy_id)
            if found:
                self.heads.seed(policy_id, found[-1])
                entry = self.heads.get(policy_id)
        return entry

    def _local(self, policy_id: str, entry: str) -> Path:
        """The entry's directory here, fetched from the shared copy when missing."""
        path = self._dir(policy_id) / entry
        if (path / JOURNAL_FILE).is_file() or self.remote is None:
            return path
        tmp = Path(tempfile.mkdtemp(prefix=".get.", dir=self._mkdir(policy_id)))
        try:
            for name in (*CHECKPOINT_FILES, JOURNAL_FILE):
                self.remote.get(f"{self._key(policy_id, entry)}/{name}", tmp / name)
            os.rename(tmp, path)
        except OSError:
            if not (path / JOURNAL_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _mkdir(self, policy_id: str) -> Path:
        d = self._dir(policy_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def latest(self, policy_id: str) -> JournalEntry | None:
        entry = self.head(policy_id)
        if entry is None:
            return None
        raw = json.loads((self._local(policy_id, entry) / JOURNAL_FILE).read_text())
        return JournalEntry(int(raw["step"]), frozenset(raw["event_ids"]),
                            PolicyUpdated.model_validate(raw["output"]))

    def commit(self, policy_id: str, trainer: Checkpointable, output: PolicyUpdated,
               event_ids: Sequence[str]) -> Path:
        """Durably record a step on top of step `output.step - 1`, or raise `StaleStep`."""
        parent = self._mkdir(policy_id)
        entry = f"{output.step:012d}-{uuid.uuid4().hex[:12]}"
        final = self._write(parent, entry, trainer, policy_id, output, event_ids)
        won, current = self.heads.advance(policy_id, output.step - 1, entry)
        if not won:
            self._remove(policy_id, entry)
            raise StaleStep(f"step {output.step} of {policy_id} was computed from step "
                            f"{output.step - 1}, but its newest step is {step_of(current)}: "
                            "another worker advanced it")
        self._prune(policy_id, entry)
        return final

    def _write(self, parent: Path, entry: str, trainer: Checkpointable, policy_id: str,
               output: PolicyUpdated, event_ids: Sequence[str]) -> Path:
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
            final = parent / entry
            os.rename(tmp, final)
            fsync_path(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.remote is not None:  # the marker (journal.json) last
            for name in (*CHECKPOINT_FILES, JOURNAL_FILE):
                self.remote.put(final / name, f"{self._key(policy_id, entry)}/{name}")
        return final

    def _remove(self, policy_id: str, entry: str) -> None:
        shutil.rmtree(self._dir(policy_id) / entry, ignore_errors=True)
        if self.remote is not None:
            self.remote.delete(self._key(policy_id, entry))

    def _prune(self, policy_id: str, head: str) -> None:
        """Keep the head and the `keep - 1` entries before it; drop older ones and leftovers
        of crashed or fenced commits at or below the head's step. Entries above the head may
        be another worker's commit in flight: never touched."""
        older = [e for e in self._entries(policy_id) if step_of(e) <= step_of(head) and e != head]
        kept = set(older[len(older) - (self.keep - 1):]) if self.keep > 1 else set()
        for entry in older:
            if entry not in kept:
                self._remove(policy_id, entry)
        for stale in self._dir(policy_id).glob(".tmp.*"):
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self, policy_id: str, trainer: Checkpointable) -> int | None:
        """Load the head step into the trainer; returns its step (None: no step yet)."""
        entry = self.head(policy_id)
        if entry is None:
            return None
        trainer.load_checkpoint(policy_id, self._local(policy_id, entry))
        return step_of(entry)

    def replay(self, policy_id: str, events: Sequence[E]) -> tuple[PolicyUpdated | None, list[E]]:
        """Split a batch: the head step's recorded output if it consumed any of these events,
        and the events still to train."""
        entry = self.latest(policy_id)
        if entry is None:
            return None, list(events)
        done = [e for e in events if e.event_id in entry.event_ids]
        fresh = [e for e in events if e.event_id not in entry.event_ids]
        return (entry.output if done else None), fresh


def _is_entry(name: str) -> bool:
    step, _, token = name.partition("-")
    return step.isdigit() and len(step) == 12 and bool(token)


# -- the update stage's calls ----------------------------------------------------------------------
def journal_of(ctx: StageContext) -> StepJournal:
    store = ctx.store
    return StepJournal(store.root / "journal", RedisHeads(ctx.state.r, ctx.state.keys),
                       remote=store.remote)


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
    """Make a trained step durable and the policy's head, or raise `StaleStep`."""
    journal_of(ctx).commit(output.policy_id, ctx.trainer, output, [e.event_id for e in events])
