"""Retention: collect adapter files no alias or retained revision needs.

The rule is `workers.catalog.lifecycle.RetentionPolicy` (aliases and their parents, the newest K
revisions, in-flight revisions are kept). Files are shared by content hash, so a file is deleted
only when no kept revision of any policy has the same sha256; files in the store that no catalog
revision names at all (a crashed export) are deleted once older than a grace period. Each collected
revision gets an `ArtifactCollected` record, so the catalog keeps saying where its files were
and why they are gone. The record of the revision itself is never deleted.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.catalog import ArtifactCollected
from workers.catalog.entries import PolicyEntry
from workers.catalog.lifecycle import RetentionPolicy, retained
from workers.catalog.writer import Catalog

ORPHAN_GRACE_S = 3600.0


@dataclass
class GcReport:
    policy: str
    kept_revisions: int = 0
    collected: list[tuple[str, int, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "dry_run": self.dry_run, "kept_revisions": self.kept_revisions,
            "collected": [{"policy_id": p, "revision": n, "sha256": s}
                          for p, n, s in self.collected],
            "orphans": self.orphans, "bytes_freed": self.bytes_freed,
        }


def plan(entries: list[PolicyEntry], policy: RetentionPolicy) -> tuple[set[str], list[Any]]:
    """(sha256s that must stay, revisions whose files may go) over every policy."""
    keep_shas: set[str] = set()
    drop: list[tuple[str, int, str]] = []
    for e in entries:
        revs = {n: (r.state, r.parent) for n, r in e.revisions.items()}
        keep = retained(revs, [e.serving, e.candidate], policy)
        for n, r in e.revisions.items():
            if n in keep:
                keep_shas.add(r.sha256)
            elif not r.collected:
                drop.append((e.policy_id, n, r.sha256))
    return keep_shas, drop


def collect(catalog: Catalog, policy: RetentionPolicy | None = None, *, dry_run: bool = False,
            orphan_grace_s: float = ORPHAN_GRACE_S) -> GcReport:
    """Apply the retention policy to the artifact store; returns what was (or would be) freed."""
    policy = policy or RetentionPolicy()
    report = GcReport(policy=policy.describe(), dry_run=dry_run)
    entries = [e for pid in catalog.index.policy_ids() if (e := catalog.index.get(pid))]
    keep_shas, drop = plan(entries, policy)
    report.kept_revisions = sum(len(e.revisions) for e in entries) - len(drop)
    named = {r.sha256 for e in entries for r in e.revisions.values()}
    adapters = catalog.index.adapters_dir
    for pid, n, sha in drop:
        if sha in keep_shas:
            continue  # same weights as a kept revision: the file stays, the revision too
        report.collected.append((pid, n, sha))
        report.bytes_freed += _remove(adapters / sha, dry_run)
    if not dry_run and report.collected:
        catalog.publish([ArtifactCollected(
            event_id=uuid.uuid4().hex, policy_id=pid, revision=n, sha256=sha,
            policy=report.policy) for pid, n, sha in report.collected])
    cutoff = time.time() - orphan_grace_s
    for path in sorted(adapters.glob("*")) if adapters.is_dir() else []:
        if path.name not in named and path.stat().st_mtime < cutoff:
            report.orphans.append(path.name)
            report.bytes_freed += _remove(path, dry_run)
    return report


def _remove(path: Path, dry_run: bool) -> int:
    """Delete an adapter dir: rename it out of the store first, so no reader sees it half gone."""
    if not path.is_dir():
        return 0
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    if not dry_run:
        doomed = path.with_name(f".gc-{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return size
