"""The ingest benchmark's summary: the median runs side by side, every run kept."""

from loadtests.pipeline import summarise


def _run(rate: float, cpu: float = 150.0) -> dict[str, float | int]:
    return {"events": 10, "events_per_s": rate, "ready_s": 1.0, "worker_cpu_us_per_event": cpu}


def test_summary_sets_the_median_stage_run_against_the_median_floor() -> None:
    floors = [_run(6000.0, 140.0), _run(5000.0, 145.0), _run(5500.0, 142.0)]
    stages = [_run(5400.0), _run(4000.0), _run(5000.0, 160.0)]
    out = summarise(floors, stages)
    assert out["events_per_s"] == 5000.0 and out["worker_cpu_us_per_event"] == 160.0
    assert out["floor_events_per_s"] == 5500.0
    assert out["floor_worker_cpu_us_per_event"] == 142.0
    assert out["ratio_to_floor"] == round(5000 / 5500, 3)
    assert out["runs_ratio_to_floor"] == [0.9, 0.8, round(5000 / 5500, 3)]
    assert out["repeats"] == 3


def test_an_even_count_takes_the_lower_middle_run() -> None:
    out = summarise([_run(2.0), _run(4.0)], [_run(1.0), _run(3.0)])
    assert (out["events_per_s"], out["floor_events_per_s"]) == (1.0, 2.0)
