"""Catalog set-up for tests: revisions recorded and promoted through the real catalog writer
(Kafka's `catalog` topic, then the Redis index), as the export and promote stages do."""

from __future__ import annotations

from schemas.catalog import LoraConfig, Provenance, RevisionEvaluated
from workers.catalog.writer import Catalog

BASE_HASH = "cd" * 32


def provenance(step: int) -> Provenance:
    return Provenance(parent_revision=0, base_model_hash=BASE_HASH, trainer_version="test",
                      hyperparameters={"learning_rate": 0.01}, first_step=step, last_step=step,
                      tokens=10 * step, started_ts=1.0, finished_ts=2.0)


def record(catalog: Catalog, pid: str, sha256: str, step: int, size_bytes: int = 1) -> int:
    """Register the policy if new and record a revision made by trainer step `step`; returns
    its number (the same step gives the same number)."""
    catalog.register(pid, base_model="tiny", base_model_hash=BASE_HASH,
                     lora=LoraConfig(rank=1, alpha=2.0, target_modules=("q_proj",)))
    return catalog.record_revision(pid, step=step, sha256=sha256, size_bytes=size_bytes,
                                   provenance=provenance(step)).revision


def evaluate_and_promote(catalog: Catalog, pid: str, n: int) -> None:
    """A passing evaluation, then the promotion: the serving alias and the hot set move."""
    catalog.record_evaluation(RevisionEvaluated(
        policy_id=pid, revision=n, score=float(n), baseline_revision=n - 1,
        baseline_score=n - 1.0, prompts=2, passed=True, reason="better"))
    catalog.promote(pid, n, "better")


def serve(catalog: Catalog, pid: str, sha256: str) -> int:
    """Record the policy's next revision and promote it; returns its number."""
    entry = catalog.index.get(pid)
    n = record(catalog, pid, sha256, step=(entry.head if entry else 0) + 1)
    evaluate_and_promote(catalog, pid, n)
    return n
