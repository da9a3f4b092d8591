"""The ingest benchmark's summary: the median runs side by side, every run kept."""

from loadtests.pipeline import Commit, drained_at, summarise


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


def test_the_drain_ends_where_its_rate_empties_the_last_lag() -> None:
    # commits a second apart, 6000 events a second: the last 1500 took a quarter second
    steps = [Commit(10.0, 12000, 0.1), Commit(11.0, 7500, 0.1), Commit(12.0, 1500, 0.1),
             Commit(13.0, 0, 0.1)]
    assert drained_at(steps) == 12.25


def test_the_drain_ends_at_the_first_zero_without_two_precise_commits_before() -> None:
    assert drained_at([Commit(5.0, 900, 0.1), Commit(6.0, 0, 0.1)]) == 6.0
    coarse = [Commit(10.0, 12000, 0.5), Commit(11.0, 6000, 0.1), Commit(12.0, 0, 0.1)]
    assert drained_at(coarse) == 12.0
    # a rate that would put the end after the zero was seen is not believed
    assert drained_at([Commit(1.0, 100, 0.1), Commit(2.0, 99, 0.1), Commit(2.5, 0, 0.1)]) == 2.5
