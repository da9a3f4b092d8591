"""Online rollback: evidence about the revision serving now, and one way back.

Two signals, each kept per (policy, revision) as a bounded window in Redis:
- rollout rewards (`observe_rewards` in `workers/pipeline/guards.py`): the rollout stage samples
  the training head, so whenever the head serves, its rollout rewards are the serving
  revision's. Absolute rule: the mean over `online_rollback_window` groups below
  `online_rollback_threshold` (off unless set).
- production feedback (`observe_feedback`, called by the gateway): users' scores in [-1, 1] of
  answers the revision gave. Relative rule: the mean of the serving revision's latest
  `feedback_rollback_window` scores (at least `feedback_rollback_min_count`) below the mean
  the revision a rollback would restore earned while it served, by more than
  `feedback_rollback_margin`. Relative, because what counts as a good score depends on the
  users; with no such baseline yet (too little feedback on the previous revision) it decides
  nothing.

Either rolls back through `Catalog.rollback`, the path `lorastream rollback` takes (catalog
records, index, hot set, a `PolicyRolledBack` on `promotions`), at most once per revision: one
marker key, shared by both signals and by every worker and gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from infra.settings import Settings
from schemas.events import PolicyRolledBack
from workers.catalog.index import CatalogIndex
from workers.catalog.writer import Catalog, default_rollback_target
from workers.keys import RedisKeys

log = logging.getLogger(__name__)


def push_window(r: redis.Redis, key: str, value: float, window: int) -> list[float]:
    """Add a value to a bounded window (newest first) and return the window, atomically."""
    pipe = r.pipeline(transaction=True)
    pipe.lpush(key, value)
    pipe.ltrim(key, 0, window - 1)
    pipe.lrange(key, 0, -1)
    return [float(x) for x in pipe.execute()[-1]]


def window(r: redis.Redis, key: str) -> list[float]:
    return [float(x) for x in r.lrange(key, 0, -1)]  # type: ignore[union-attr]


def rollback_once(r: redis.Redis, keys: RedisKeys, catalog: Catalog, policy_id: str,
                  revision: int, reason: str) -> PolicyRolledBack | None:
    """Roll `revision` back unless some process already did (one marker per revision)."""
    if not r.set(keys.online_rolled_back(policy_id, revision), 1, nx=True):
        return None
    log.warning("rolling back %s r%d: %s", policy_id, revision, reason)
    return catalog.rollback(policy_id, reason=f"automatic: {reason}")


def observe_feedback(settings: Settings, r: redis.Redis, index: CatalogIndex,
                     catalog: Callable[[], Catalog], policy_id: str, revision: int,
                     score: float) -> PolicyRolledBack | None:
    """Keep one production score of `revision`; roll serving back if the rule above says so.

    `catalog` is called only when a rollback happens (the writer needs a Kafka producer)."""
    keys = RedisKeys(settings)
    size = settings.feedback_rollback_window
    current = push_window(r, keys.online_feedback(policy_id, revision), score, size)
    need = settings.feedback_rollback_min_count
    if not settings.feedback_rollback or revision == 0 or len(current) < need:
        return None
    entry = index.get(policy_id)
    if entry is None or entry.serving != revision:
        return None  # only the serving revision's feedback decides about serving
    previous = default_rollback_target(entry)
    baseline = window(r, keys.online_feedback(policy_id, previous))[:size]
    if len(baseline) < need:
        return None
    mean, base_mean = sum(current) / len(current), sum(baseline) / len(baseline)
    if mean >= base_mean - settings.feedback_rollback_margin:
        return None
    reason = (f"production feedback {mean:.3f} over {len(current)} answers of r{revision} "
              f"below r{previous}'s {base_mean:.3f} over {len(baseline)} by more than "
              f"{settings.feedback_rollback_margin}")
    return rollback_once(r, keys, catalog(), policy_id, revision, reason)
