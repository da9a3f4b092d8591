"""Provenance of a revision: which trainer steps (and so which rewards messages) made it.

The export stage sees every `PolicyUpdated`, in order, but only checkpoint steps become
revisions; it notes each step here (one small hash per policy, keyed by step, so a redelivered
step is written once) and, at a checkpoint, turns the steps since the parent revision into a
`Provenance`. The notes are dropped once the revision is recorded in the catalog.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import orjson
import redis

from infra.settings import Settings
from schemas.catalog import Provenance, RewardFnRef
from schemas.events import PolicyUpdated
from workers.catalog.lifecycle import offset_ranges
from workers.keys import RedisKeys

HYPERPARAMETERS = ("group_size", "max_new_tokens", "temperature", "learning_rate", "lora_rank",
                   "lora_alpha", "kl_beta", "clip_eps", "dpo_beta", "dpo_sft_weight",
                   "export_every", "max_in_flight", "seed", "update_batch")


@functools.cache
def trainer_version() -> str:
    """Package version plus a hash of the trainer's source (GRPO's math and the multi-policy
    step): changes whenever the code that computes the update does, even between releases."""
    try:
        version = importlib.metadata.version("lorastream")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    training = Path(__file__).parents[1] / "training"
    source = b"".join((training / name).read_bytes() for name in
                      ("grpo.py", "objectives.py", "perpolicy.py", "multitrainer.py"))
    return f"lorastream {version} grpo:{hashlib.sha256(source).hexdigest()[:12]}"


@functools.cache
def cached_base_hash(path: str) -> str:
    """The base model's content hash, computed once per process (it reads every weight file)."""
    from workers.models.base import base_model_hash

    return base_model_hash(Path(path))


def hyperparameters(settings: Settings) -> dict[str, float | int | str | bool]:
    data = settings.model_dump()
    return {k: data[k] for k in HYPERPARAMETERS if k in data}


class StepLog:
    """Per-policy notes of trainer steps not yet folded into a revision."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.r = client

    def _key(self, policy_id: str) -> str:
        return RedisKeys(self.settings).step_notes(policy_id)

    def note(self, event: PolicyUpdated) -> None:
        note = {"ts": event.ts, "tokens": event.tokens, "ids": event.rollout_ids,
                "fns": event.reward_fns, "cfg": event.config_id, "hp": event.config,
                "pos": [[s.topic, s.partition, s.offset] for s in event.sources]}
        self.r.hset(self._key(event.policy_id), str(event.step), orjson.dumps(note))

    def steps(self, policy_id: str, after: int, upto: int) -> dict[int, dict[str, Any]]:
        raw = self.r.hgetall(self._key(policy_id))
        notes = {int(k): orjson.loads(v) for k, v in raw.items()}
        return {s: n for s, n in sorted(notes.items()) if after < s <= upto}

    def forget(self, policy_id: str, upto: int) -> None:
        key = self._key(policy_id)
        old = [k for k in self.r.hkeys(key) if int(k) <= upto]
        if old:
            self.r.hdel(key, *old)


def build_provenance(settings: Settings, notes: dict[int, dict[str, Any]], *, parent: int,
                     base_hash: str, first_step: int, last_step: int,
                     fallback_ts: float) -> Provenance:
    """The provenance of a revision made by trainer steps `first_step..last_step`."""
    fns = sorted({(f, v) for n in notes.values() for f, v in (n.get("fns") or {}).items()})
    positions = [(t, p, o) for n in notes.values() for t, p, o in n.get("pos") or ()]
    stamps = [n["ts"] for n in notes.values()] or [fallback_ts]
    configs = tuple(dict.fromkeys(n["cfg"] for n in notes.values() if n.get("cfg")))
    own: dict[str, Any] = next((n["hp"] for n in reversed(notes.values()) if n.get("hp")), {})
    return Provenance(
        parent_revision=parent,
        base_model_hash=base_hash,
        trainer_version=trainer_version(),
        hyperparameters={**hyperparameters(settings),
                         **{k: v for k, v in own.items() if v is not None}},
        configs=configs,
        reward_fns=tuple(RewardFnRef(name=f, version=v) for f, v in fns),
        rollouts=offset_ranges(positions),
        rollout_ids=tuple(i for n in notes.values() for i in n.get("ids") or ()),
        first_step=first_step,
        last_step=last_step,
        tokens=sum(int(n.get("tokens") or 0) for n in notes.values()),
        started_ts=min(stamps),
        finished_ts=max(stamps),
    )
