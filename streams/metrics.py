"""Prometheus metrics shared by every stage (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "lorastream_events_total",
    "Events handled per stage, by outcome (ok, duplicate, dead_letter).",
    ["stage", "outcome"],
)
LATENCY = Histogram(
    "lorastream_stage_seconds",
    "Time from decoding an event to having sent its outputs.",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
