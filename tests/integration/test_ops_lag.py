"""`lorastream lag` against the real broker: Kafka's own numbers, rates and time to drain."""

from __future__ import annotations

import json

import pytest
from kafka import TopicPartition

from infra import admin, services
from infra.settings import Settings
from tests.support.kafka import commit, produce
from tests.support.processes import lorastream

pytestmark = pytest.mark.integration


def _kafka_describe(settings: Settings, group: str) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(current, log end, lag) per partition, as kafka-consumer-groups.sh --describe prints it."""
    done = services.run_kafka_tool(
        settings, "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "--bootstrap-server", settings.bootstrap_servers, "--describe", "--group", group,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cols = line.split()
        if cols and cols[0] == group:
            rows[(cols[1], int(cols[2]))] = (int(cols[3]), int(cols[4]), int(cols[5]))
    return rows


def test_lag_command_agrees_with_kafka_consumer_groups(settings: Settings) -> None:
    group = f"{settings.app_id}-ops-lag"
    layout = {("interactions", 0): (7, 3), ("interactions", 1): (5, 5), ("rollouts", 1): (4, 0)}
    offsets = {}
    for (name, part), (written, consumed) in layout.items():
        tp = TopicPartition(settings.topic(name), part)
        produce(settings, tp, [b"x"] * written)
        offsets[tp] = consumed
    commit(settings, group, offsets)

    done = lorastream(settings, "lag", "--group", group, "--json", "--sample", "0.5")
    assert done.returncode == 0, done.stderr
    ours = {(r["topic"], r["partition"]): r for r in json.loads(done.stdout)}
    theirs = _kafka_describe(settings, group)
    assert set(ours) == set(theirs) == {(tp.topic, tp.partition) for tp in offsets}
    for key, (current, end, lag) in theirs.items():
        row = ours[key]
        assert (row["committed"], row["end_offset"], row["lag"]) == (current, end, lag)
        # Nobody consumes between the two samples: the rate is measured, and it is zero.
        assert row["rate"] == 0.0
        assert row["drain_s"] == (0.0 if lag == 0 else None)


def test_rate_and_time_to_drain_from_successive_samples(settings: Settings) -> None:
    group = f"{settings.app_id}-ops-rate"
    tp = TopicPartition(settings.topic("rewards"), 0)
    produce(settings, tp, [b"r"] * 20)
    commit(settings, group, {tp: 5})
    tracker = admin.LagTracker(window_s=30)
    first = tracker.add(admin.consumer_lag(settings, group=group), now=100.0)
    assert [(r.lag, r.rate, r.drain_s) for r in first] == [(15, None, None)]

    commit(settings, group, {tp: 15})  # 10 consumed ...
    produce(settings, tp, [b"r"] * 2)  # ... while 2 more arrived, over 5 s
    second = tracker.add(admin.consumer_lag(settings, group=group), now=105.0)
    (row,) = second
    assert (row.committed, row.end_offset, row.lag) == (15, 22, 7)
    assert row.rate == pytest.approx(2.0)
    assert row.drain_s == pytest.approx(7 / (2.0 - 0.4), abs=0.1)  # net 1.6 records/s

    commit(settings, group, {tp: 22})
    (caught_up,) = tracker.add(admin.consumer_lag(settings, group=group), now=110.0)
    assert (caught_up.lag, caught_up.drain_s) == (0, 0.0)
    assert caught_up.rate == pytest.approx(17 / 10)  # measured against the oldest sample
    assert admin.lag_by_topic([caught_up]) == {tp.topic: {"lag": 0, "rate": 1.7}}


def test_lag_watch_prints_refreshes_as_json_lines(settings: Settings) -> None:
    group = f"{settings.app_id}-ops-watch"
    tp = TopicPartition(settings.topic("exports"), 1)
    produce(settings, tp, [b"e"] * 3)
    commit(settings, group, {tp: 1})

    done = lorastream(settings, "lag", "--group", group, "--watch", "0.2", "--count", "3",
                      "--json")
    assert done.returncode == 0, done.stderr
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(frames) == 3
    assert [f["rows"][0]["lag"] for f in frames] == [2, 2, 2]
    assert frames[0]["rows"][0]["rate"] is None  # one sample: no rate yet
    assert frames[2]["rows"][0]["rate"] == 0.0

    table = lorastream(settings, "lag", "--group", group, "--sample", "0.2")
    assert table.returncode == 0, table.stderr
    assert "RATE/s" in table.stdout and "DRAIN" in table.stdout
    assert "never" in table.stdout  # lag 2, nothing consuming: it will not drain
