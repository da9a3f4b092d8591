"""The demo's follower settles when a passing revision lost at promotion (a better one was
promoted between its evaluation and its promotion): the promote stage dead-letters it, and
waiting for its promotion would never end."""

from __future__ import annotations

import base64

import orjson

from infra.settings import Settings
from streams.sdk.follow import PipelineFollower


def _put(f: PipelineFollower, kind: str, event: dict[str, object]) -> None:
    f._apply(f.settings.topic(kind), orjson.dumps({"policy_id": "p", **event}))


def _evaluated(revision: int) -> dict[str, object]:
    return {"revision": revision, "baseline_revision": revision - 1, "baseline_score": 0.1,
            "passed": True}


def test_a_passing_revision_refused_at_promotion_settles() -> None:
    f = PipelineFollower(Settings(), ["p"], interactions=2)
    _put(f, "updates", {"step": f.settings.export_every * 2, "rollout_ids": ["a", "b"],
                        "mean_reward": 0.0, "loss": 1.0})
    _put(f, "evaluations", _evaluated(1))
    _put(f, "evaluations", _evaluated(2))
    _put(f, "promotions", {"revision": 1, "score": 0.5, "path": "r1"})
    assert not f.done()  # r2 passed: its promotion is still to come
    original = base64.b64encode(orjson.dumps(_evaluated(2))).decode()
    _put(f, "dead-letters", {"stage": "promote", "original_b64": original})
    assert f.done() and f.progress["p"].refused == {2}
    assert f.progress["p"].dead_letters == 0  # not an interaction that failed to train
