"""Kafka administration: pipeline topics and consumer-group lag.

Topics are created explicitly before any worker starts (see `infra.topics`), idempotently, so
`infra up` and every test fixture can call `create_topics` without caring what exists. Lag is
computed from the broker's own view (committed offset per group and partition vs. log end), the
same numbers `kafka-consumer-groups.sh --describe` shows, so it works for any client (Faust,
kafka-python, Java) and needs no metrics endpoint.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import kafka.errors as Errors
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, OffsetSpec

from infra.settings import Settings
from infra.topics import PIPELINE_TOPICS, TopicSpec


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by every kafka-python client (admin, producer, consumer)."""
    from infra.security import kafka_python_config

    return kafka_python_config(settings)


def admin_client(settings: Settings, timeout_s: float = 30.0) -> KafkaAdminClient:
    """An admin client that gives up after `timeout_s` instead of kafka-python's long defaults.

    Use it as a context manager so the connection is closed.
    """
    ms = int(timeout_s * 1000)
    return KafkaAdminClient(
        **client_config(settings),
        client_id=f"{settings.app_id}-admin",
        request_timeout_ms=ms,
        bootstrap_timeout_ms=ms,
        reconnect_backoff_max_ms=1000,
    )


# ----------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class TopicInfo:
    """A topic as the broker sees it: partition count and its non-default configs."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


_OK_CREATE = {0, Errors.TopicAlreadyExistsError.errno}


def create_topics(
    settings: Settings,
    specs: Sequence[TopicSpec] = PIPELINE_TOPICS,
    partitions: int | None = None,
) -> list[str]:
    """Create the topics in `specs` (full names via `settings.topic`); existing ones are fine.

    Returns the names that were newly created. Waits until every topic has a leader, so callers
    can produce at once.
    """
    count = partitions if partitions is not None else settings.partitions
    wanted = {
        settings.topic(s.name): {
            "num_partitions": count,
            "replication_factor": -1,  # broker default: 1 locally, the cluster's elsewhere
            "configs": s.kafka_configs(),
        }
        for s in specs
    }
    with admin_client(settings) as admin:
        result = admin.create_topics(wanted, raise_errors=False)
        created, failed = [], []
        for topic in result["topics"]:
            code = topic["error_code"]
            if code == 0:
                created.append(topic["name"])
            elif code not in _OK_CREATE:
                failed.append(f"{topic['name']}: {Errors.for_code(code).__name__} "
                              f"{topic.get('error_message') or ''}".strip())
        if failed:
            raise RuntimeError("creating Kafka topics failed: " + "; ".join(failed))
        admin.wait_for_topics(list(wanted), timeout_ms=30000)
    return created


def list_topics(settings: Settings, prefix: str | None = None) -> list[str]:
    """Topic names, sorted; only those starting with `prefix` when given."""
    with admin_client(settings) as admin:
        names = admin.list_topics()
    return sorted(n for n in names if prefix is None or n.startswith(prefix))


def describe_topics(settings: Settings, names: Iterable[str]) -> dict[str, TopicInfo]:
    """Partition counts and modified configs of existing topics (missing names are left out)."""
    wanted = list(names)
    with admin_client(settings) as admin:
        meta = admin.describe_topics(wanted)
        present = [t["name"] for t in meta if t.get("error_code", 0) == 0]
        if not present:
            return {}
        resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in present]
        configs = admin.describe_configs(resources)
    by_topic = configs.get("topic", {})
    return {
        t["name"]: TopicInfo(
            name=t["name"],
            partitions=len(t["partitions"]),
            configs={k: str(v.get("value")) for k, v in by_topic.get(t["name"], {}).items()},
        )
        for t in meta
        if t["name"] in present
    }


def delete_topics(settings: Settings, names: Iterable[str]) -> None:
    """Delete topics; unknown names are ignored (cleanup must be safe to repeat)."""
    wanted = list(names)
    if not wanted:
        return
    with admin_client(settings) as admin:
        result = admin.delete_topics(wanted, raise_errors=False)
    unknown = Errors.UnknownTopicOrPartitionError.errno
    failed = [t for t in result["topics"] if t["error_code"] not in (0, unknown)]
    if failed:
        raise RuntimeError(f"deleting Kafka topics failed: {failed}")


# ----------------------------------------------------------------------------- lag


@dataclass(frozen=True)
class LagRow:
    """One group's position on one partition: `lag = end_offset - committed`.

    `rate` and `drain_s` need two samples over time (see `LagTracker`); a single sample leaves
    them `None`. `rate` is records the group committed per second; `drain_s` is how long the lag
    takes to reach 0 at the current *net* rate (consumption minus what producers add meanwhile):
    0 when caught up, `None` when unknown or when the lag is not shrinking.
    """

    group: str
    topic: str
    partition: int
    committed: int
    end_offset: int
    lag: int
    rate: float | None = None
    drain_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group_ids(admin: KafkaAdminClient) -> list[str]:
    return sorted(g["group_id"] for g in admin.list_groups())


def _committed(admin: KafkaAdminClient, groups: list[str]) -> dict[str, dict[TopicPartition, int]]:
    """Committed offsets per group; a group the broker cannot answer for is skipped."""
    out: dict[str, dict[TopicPartition, int]] = {}
    for group in groups:  # one by one: a failing group must not hide the others
        try:
            offsets = admin.list_group_offsets({group: None}).get(group, {})
        except Errors.KafkaError:
            continue
        out[group] = {tp: om.offset for tp, om in offsets.items() if om.offset >= 0}
    return out


def consumer_lag(
    settings: Settings, group: str | None = None, all_topics: bool = False
) -> list[LagRow]:
    """Lag of every consumer group (or just `group`) with committed offsets.

    Only topics carrying `settings.topic_prefix` are reported unless `all_topics`; groups with no
    committed offsets on those topics do not appear.
    """
    with admin_client(settings) as admin:
        groups = [group] if group else _group_ids(admin)
        committed = _committed(admin, groups) if groups else {}
        wanted = {
            tp
            for offsets in committed.values()
            for tp in offsets
            if all_topics or tp.topic.startswith(settings.topic_prefix)
        }
        specs = {tp: OffsetSpec.LATEST for tp in wanted}
        ends = admin.list_partition_offsets(specs) if specs else {}
    rows = [
        LagRow(g, tp.topic, tp.partition, off, ends[tp].offset, max(ends[tp].offset - off, 0))
        for g, offsets in committed.items()
        for tp, off in offsets.items()
        if tp in ends
    ]
    return sorted(rows, key=lambda r: (r.group, r.topic, r.partition))


LagKey = tuple[str, str, int]


class LagTracker:
    """Turns successive lag samples into consumption rates and times to drain.

    Kafka only knows positions, not speeds, so a rate needs two samples. The tracker keeps the
    samples of the last `window_s` seconds and measures against the oldest: Faust commits about
    once a second, so a longer window smooths the steps that per-commit sampling would show.
    """

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[LagKey, LagRow]]] = deque()

    def add(self, rows: Sequence[LagRow], now: float | None = None) -> list[LagRow]:
        """Record a sample taken at `now` (monotonic seconds); return it with rates filled in."""
        now = time.monotonic() if now is None else now
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()  # keep one sample at least `window_s` old, when there is one
        base = self._samples[0] if self._samples else None
        out = [_with_rate(r, base, now) for r in rows]
        self._samples.append((now, {(r.group, r.topic, r.partition): r for r in rows}))
        return out


def _with_rate(row: LagRow, base: tuple[float, dict[LagKey, LagRow]] | None,
               now: float) -> LagRow:
    if base is None or now <= base[0]:
        return row
    prev = base[1].get((row.group, row.topic, row.partition))
    if prev is None or row.committed < prev.committed:  # new partition, or offsets were reset
        return row
    dt = now - base[0]
    rate = (row.committed - prev.committed) / dt
    inflow = max(row.end_offset - prev.end_offset, 0) / dt
    if row.lag == 0:
        drain: float | None = 0.0
    elif rate - inflow > 0:
        drain = row.lag / (rate - inflow)
    else:
        drain = None  # not shrinking: it never drains at this pace
    return replace(row, rate=round(rate, 3), drain_s=None if drain is None else round(drain, 1))


def sample_lag(
    settings: Settings,
    group: str | None = None,
    all_topics: bool = False,
    interval_s: float = 1.0,
) -> list[LagRow]:
    """Lag with rates from two samples `interval_s` apart (one sample, no rates, when <= 0)."""
    rows = consumer_lag(settings, group=group, all_topics=all_topics)
    if interval_s <= 0:
        return rows
    tracker = LagTracker(window_s=interval_s * 2)
    tracker.add(rows)
    time.sleep(interval_s)  # a rate is a difference over time: there is nothing to poll for
    return tracker.add(consumer_lag(settings, group=group, all_topics=all_topics))


def lag_by_topic(rows: Iterable[LagRow]) -> dict[str, dict[str, float | int | None]]:
    """Total lag and consumption rate per topic (over every group and partition)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for r in rows:
        t = out.setdefault(r.topic, {"lag": 0, "rate": None})
        t["lag"] = int(t["lag"] or 0) + r.lag
        if r.rate is not None:
            t["rate"] = round(float(t["rate"] or 0.0) + r.rate, 3)
    return out


def delete_groups(settings: Settings, prefix: str) -> list[str]:
    """Delete the (inactive) consumer groups whose id starts with `prefix`; returns those deleted.

    Test fixtures use this so throwaway groups do not pile up in `lorastream lag`.
    """
    with admin_client(settings) as admin:
        groups = [g for g in _group_ids(admin) if g.startswith(prefix)]
        result = admin.delete_groups(groups) if groups else {}
    return sorted(g for g, outcome in result.items() if outcome == "OK")
