"""Serving's Prometheus metrics: what each engine's residency controller reports.

Defined here, with serving, so `workers` never imports `streams`; a process that serves
`/metrics` (`streams/ops/metrics.py`) exposes them with the pipeline's, from one registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

HOT_SET = Gauge("lorastream_hot_set_size", "Adapters in an engine's hot working set.", ["engine"])
RESIDENCY = Gauge("lorastream_adapters", "Adapters per residency state (e.g. gpu, cpu, disk).",
                  ["engine", "state"])
COLD_LOADS = Counter("lorastream_cold_loads_total", "Adapters an engine loaded on demand (not "
                     "already resident).", ["engine"])
def set_hot_set(engine: str, size: int) -> None:
    """An engine reports how many adapters its hot working set holds."""
    HOT_SET.labels(engine).set(size)


def set_residency(engine: str, state: str, count: int) -> None:
    """An engine reports how many adapters are in one residency state (gpu, cpu, disk, ...)."""
    RESIDENCY.labels(engine, state).set(count)


def note_cold_load(engine: str, count: int = 1) -> None:
    """An engine had to load an adapter that was not resident."""
    COLD_LOADS.labels(engine).inc(count)
