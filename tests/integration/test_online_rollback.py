"""Production feedback's rollback rule (`workers/catalog/online.py`) on real Redis and the real
catalog writer: it needs enough feedback on both revisions, respects the margin, judges only
the serving revision, and rolls a revision back once."""

from __future__ import annotations

import redis

from infra.settings import Settings
from tests.support.catalog import serve
from workers.catalog.online import observe_feedback
from workers.catalog.writer import Catalog


def test_feedback_rule(settings: Settings, catalog: Catalog, redis_client: redis.Redis) -> None:
    run = settings.model_copy(update={"feedback_rollback_min_count": 3,
                                      "feedback_rollback_window": 4,
                                      "feedback_rollback_margin": 0.25})

    def rate(revision: int, score: float) -> int | None:
        rolled = observe_feedback(run, redis_client, catalog.index, lambda: catalog, "alice",
                                  revision, score)
        return rolled.to_revision if rolled is not None else None

    serve(catalog, "alice", "a1" * 32)
    serve(catalog, "alice", "a2" * 32)  # r2 serves; r1 has no feedback yet: no baseline
    assert [rate(2, -1.0) for _ in range(4)] == [None] * 4
    assert [rate(1, 0.5) for _ in range(3)] == [None] * 3  # r1 does not serve: only kept
    # The window keeps r2's newest 4 scores: mean -0.25 vs r1's 0.5 is worse by 0.75.
    assert rate(2, 0.5) == 1
    assert catalog.index.serving("alice").revision == 1
    serve(catalog, "alice", "a3" * 32)  # r3 serves, within the margin of r1's 0.5
    assert [rate(3, 0.3) for _ in range(4)] == [None] * 4
    run_off = run.model_copy(update={"feedback_rollback": False})
    assert observe_feedback(run_off, redis_client, catalog.index, lambda: catalog, "alice", 3,
                            -1.0) is None
