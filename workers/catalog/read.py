"""Answers that need the full records: identity details, provenance, evaluations.

The index keeps each record's offset; these helpers fetch exactly those records from the
policy's catalog partition and check each is the record the index meant (same key), so a stale
offset (a compacted-away duplicate) is reported instead of silently showing another record.
"""

from __future__ import annotations

from typing import Any

import orjson

from infra.settings import Settings
from workers.catalog.entries import PolicyEntry
from workers.catalog.log import fetch_at


def _fetch(settings: Settings, entry: PolicyEntry, offsets: list[int]) -> dict[int, dict]:
    raw = fetch_at(settings, entry.partition, offsets)
    out: dict[int, dict] = {}
    for offset, value in raw.items():
        data = orjson.loads(value) if value else None
        if isinstance(data, dict) and data.get("policy_id") == entry.policy_id:
            out[offset] = data
    return out


def identity_of(settings: Settings, entry: PolicyEntry) -> dict[str, Any]:
    """Identity fields (registration time, base, LoRA) and the last rollback, if any."""
    wanted = [entry.offset] + ([entry.rollback_offset] if entry.rollback_offset else [])
    got = _fetch(settings, entry, wanted)
    ident = got.get(entry.offset, {})
    data: dict[str, Any] = {
        "base_model": entry.base.get("name"), "base_model_hash": entry.base.get("hash"),
        "lora": entry.lora, "registered_ts": ident.get("ts"),
    }
    if entry.rollback_offset is not None and entry.rollback_offset in got:
        rb = got[entry.rollback_offset]
        data["last_rollback"] = {k: rb.get(k) for k in
                                 ("from_revision", "to_revision", "reason", "ts")}
    return data


def revisions_of(settings: Settings, entry: PolicyEntry) -> list[dict[str, Any]]:
    """Every revision, oldest first, with its provenance and evaluations (deduplicated)."""
    offsets = [r.offset for r in entry.revisions.values()]
    offsets += [o for r in entry.revisions.values() for o in r.eval_offsets]
    got = _fetch(settings, entry, offsets)
    out: list[dict[str, Any]] = []
    for n, rev in sorted(entry.revisions.items()):
        record = got.get(rev.offset, {})
        if record.get("revision") != n:
            record = {}
        evals: dict[str, dict] = {}
        for o in rev.eval_offsets:
            ev = got.get(o)
            if ev and ev.get("revision") == n:
                evals.setdefault(ev["event_id"], ev)
        out.append({
            "revision": n, "state": rev.state.value, "sha256": rev.sha256,
            "size_bytes": rev.size_bytes, "step": rev.step, "parent": rev.parent,
            "collected": rev.collected, "recorded_ts": record.get("ts"),
            "provenance": record.get("provenance"),
            "evaluations": sorted(evals.values(), key=lambda e: e.get("ts", 0.0)),
        })
    return out
