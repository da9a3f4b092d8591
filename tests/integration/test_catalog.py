"""The catalog on the real broker and Redis: lifecycle, rollback through the CLI, rebuild after
the index is wiped, and retention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
import torch

from infra.settings import Settings, settings_env
from schemas.catalog import LoraConfig
from streams.cli.main import main
from streams.sdk.watch import tail
from tests.support.catalog import evaluate_and_promote, record
from workers.artifacts.store import ArtifactStore
from workers.catalog.gc import collect
from workers.catalog.index import CatalogIndex
from workers.catalog.lifecycle import (
    IllegalTransitionError,
    RetentionPolicy,
    RevisionState,
)
from workers.catalog.read import revisions_of
from workers.catalog.writer import Catalog, CatalogError

PID = "alice"


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """`lorastream ARGS...` in this process, with this test's settings in the environment."""
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    return lambda *argv: main(list(argv))


def _export(catalog: Catalog, store: ArtifactStore, step: int, pid: str = PID) -> int:
    """Write a real artifact and record it, as the export stage does."""
    ref = store.put_adapter({"w": torch.full((2, 2), float(step))}, {"r": 1})
    return record(catalog, pid, ref.sha256, step, ref.size_bytes)


def _evaluate_and_promote(catalog: Catalog, n: int, pid: str = PID) -> None:
    evaluate_and_promote(catalog, pid, n)


def test_lifecycle_numbering_and_illegal_moves(catalog: Catalog, settings: Settings) -> None:
    store = ArtifactStore(settings.artifacts)
    assert [_export(catalog, store, s) for s in (2, 4)] == [1, 2]
    assert _export(catalog, store, 4) == 2  # the same trainer step: the same revision
    entry = catalog.entry(PID)
    assert entry.candidate == 2 and entry.revisions[2].parent == 1
    with pytest.raises(IllegalTransitionError):
        catalog.promote(PID, 1, "not evaluated yet")
    _evaluate_and_promote(catalog, 1)
    _evaluate_and_promote(catalog, 2)
    entry = catalog.entry(PID)
    assert (entry.serving, entry.candidate) == (2, 0)
    assert entry.revisions[1].state is RevisionState.RETIRED
    with pytest.raises(IllegalTransitionError):
        catalog.transition(PID, 2, RevisionState.EVALUATED)
    with pytest.raises(CatalogError, match="registered on base"):
        catalog.register(PID, base_model="other", base_model_hash="ef" * 32,
                         lora=LoraConfig(rank=1, alpha=2.0))
    res = catalog.index.resolve(PID)
    assert res is not None and res.revision == 2
    assert res.path == settings.artifacts / "adapters" / entry.revisions[2].sha256
    assert catalog.index.resolve("nobody") is None


def test_rollback_cli_moves_serving_hot_set_and_is_published(
    catalog: Catalog, settings: Settings, capsys: pytest.CaptureFixture[str],
    cli: Callable[..., int],
) -> None:
    store = ArtifactStore(settings.artifacts)
    for step in (2, 4):
        _evaluate_and_promote(catalog, _export(catalog, store, step))
    assert catalog.index.hot_set() == [f"{PID}@2"]

    assert cli("rollback", PID, "--reason", "regressed", "--json") == 0
    event = orjson.loads(capsys.readouterr().out)
    assert (event["from_revision"], event["to_revision"]) == (2, 1)
    index = CatalogIndex(settings)
    assert index.serving(PID).revision == 1 and index.hot_set() == [f"{PID}@1"]
    entry = catalog.entry(PID)
    assert entry.serving == 1 and entry.revisions[2].state is RevisionState.ROLLED_BACK
    resolved = catalog.index.resolve(PID)
    assert resolved is not None and resolved.revision == 1
    promoted = list(tail(settings, "promotions", from_beginning=True, timeout_s=3))
    assert [(p["kind"], p["to_revision"]) for p in promoted] == [("policy_rolled_back", 1)]
    with pytest.raises(IllegalTransitionError):  # a stale evaluation cannot re-promote it
        catalog.promote(PID, 2, "redelivered evaluation")

    assert cli("rollback", PID, "--to", "0") == 0  # all the way back to the base model
    assert index.serving(PID).revision == 0 and index.hot_set() == []
    assert cli("rollback", PID) == 1  # nothing left to roll back


def _snapshot(catalog: Catalog, settings: Settings) -> dict[str, Any]:
    index = CatalogIndex(settings)
    return {
        pid: {"entry": catalog.index.get(pid), "revisions": revisions_of(settings, entry),
              "resolve": catalog.index.resolve(pid), "serving": index.serving(pid),
              "head": index.head(pid), "hot": sorted(index.hot_set())}
        for pid in sorted(catalog.index.policy_ids())
        if (entry := catalog.index.get(pid)) is not None
    }


def test_rebuild_after_wiping_redis_loses_nothing(
    catalog: Catalog, settings: Settings, redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str], cli: Callable[..., int],
) -> None:
    store = ArtifactStore(settings.artifacts)
    for pid in ("alice", "bob"):
        for step in (2, 4, 6):
            _evaluate_and_promote(catalog, _export(catalog, store, step, pid), pid)
    cli("rollback", "bob", "--reason", "bad")
    before = _snapshot(catalog, settings)
    assert before["bob"]["entry"].serving == 2 and before["alice"]["entry"].serving == 3

    keys = list(redis_client.scan_iter(match=f"{settings.redis_prefix}*"))
    redis_client.delete(*keys)  # everything this pipeline had in Redis
    assert catalog.index.get("alice") is None
    capsys.readouterr()
    assert cli("catalog", "rebuild", "--json") == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["skipped"] == 0 and report["policies"] == 2
    assert _snapshot(catalog, settings) == before

    catalog.index.forget_interned()
    assert _export(catalog, store, 8, "alice") == 4  # numbering continues after the rebuild


def test_gc_collects_only_what_retention_allows(catalog: Catalog, settings: Settings) -> None:
    store = ArtifactStore(settings.artifacts)
    for step in (1, 2, 3, 4):
        _evaluate_and_promote(catalog, _export(catalog, store, step))
    _export(catalog, store, 5)  # candidate r5, serving r4, r1..r3 retired
    orphan = store.put_adapter({"w": torch.zeros(1)}, {})

    dry = collect(catalog, RetentionPolicy(keep_last=1), dry_run=True, orphan_grace_s=0)
    assert {n for _, n, _ in dry.collected} == {1, 2} and dry.orphans == [orphan.sha256]
    entry = catalog.entry(PID)
    assert all((settings.artifacts / "adapters" / r.sha256).is_dir()
               for r in entry.revisions.values())

    report = collect(catalog, RetentionPolicy(keep_last=1), orphan_grace_s=0)
    assert {n for _, n, _ in report.collected} == {1, 2} and report.bytes_freed > 0
    entry = catalog.entry(PID)
    for n, rev in entry.revisions.items():
        assert (settings.artifacts / "adapters" / rev.sha256).is_dir() == (n >= 3)
        assert rev.collected == (n <= 2)
    assert not orphan.path.exists()
    with pytest.raises(CatalogError, match="collected"):
        catalog.rollback(PID, to=1)
    assert collect(catalog, RetentionPolicy(keep_last=1), orphan_grace_s=0).collected == []
