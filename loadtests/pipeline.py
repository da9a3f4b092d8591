"""Sustained ingest through the first stage (rollout) on one worker process.

`python -m loadtests.pipeline --events 100000 --json`

A producer pushes N interaction logs into `interactions` as fast as the SDK producer takes them
while one `lorastream worker --stages rollout` process consumes them; the broker-side lag of the
worker's group is sampled every 0.5 s. The events are held-out prompts (`split: "eval"`), which
the rollout stage validates, deduplicates, admits and stores in Redis without sampling: this
measures the stage machinery (decode, schema, seen-marks, guards, Redis, commit), not the
model — sampling G completions per prompt on a CPU engine runs at tens of groups per second and
would measure the model instead.

Each worker is warmed up before the clock starts: one held-out prompt per benchmark policy
(they land on every partition), and the run begins once the group has committed them all, so
the figures compare steady consumption, not start-up. `ready_s` (launch → warm-up committed)
is reported apart: a rollout worker imports torch and loads a base model, a bare agent does not,
and on a fresh checkout that start-up alone cost a fifth of the throughput when it was timed.
`events_per_s` = N / (first send → the group has consumed everything: the commit at lag 0,
or, when the drain's earlier commits give its rate, the moment that rate empties the last lag
(`drained_at`; commits come once a second));
`max_lag` = the largest lag sampled; `drain_s` = last send → that end; `produce_per_s` = how fast
the producer queued them (the load generator's own ceiling).

Side by side in the same run, the same N events go through a bare Faust agent on the same app
settings that only takes its batches and acks them (`--bare-worker`): `floor_events_per_s` is
Faust's own ceiling on this machine, and `ratio_to_floor` how much of it the stage keeps. The
two phases alternate `--repeats` times (3): the stage's median run is reported beside the
floor's median, with every run's rate and each pair's ratio (`runs_ratio_to_floor`); one pair
alone moves by several percent, as the producer, the broker, Redis and the worker share the
machine and committed offsets advance once a second. `worker_cpu_us_per_event` is the worker
process's CPU time over the measured window, per event (Linux `/proc`); `redis_used_mb` is
Redis's memory when the run began (a big dataset's snapshots tax the stage's phases only).
Each phase runs in its own namespace (topic, group and Redis prefixes), removed afterwards.
Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import orjson
import redis

from infra import admin
from infra.settings import REPO_ROOT, Settings, settings_env
from streams.app import group_id
from streams.sdk.producer import InteractionProducer
from workers.models.base import build_tiny_model


def log(msg: str) -> None:
    print(f"[pipeline-bench] {msg}", file=sys.stderr, flush=True)


def _lag(settings: Settings, group: str) -> int | None:
    rows = [r for r in admin.consumer_lag(settings, group)
            if r.topic == settings.topic("interactions")]
    return sum(r.lag for r in rows) if rows else None


POLICIES = 64
REDIS_WARN_MB = 100.0
"""Above this, Redis's own snapshots are a measurable share of a stage phase's CPU."""


def _produce(settings: Settings, n: int, done: dict[str, float], tag: str = "") -> None:
    started = time.monotonic()
    with InteractionProducer(settings, linger_ms=20, batch_size=512 * 1024) as producer:
        for i in range(n):
            producer.send({"policy_id": f"bench-{i % POLICIES}",
                           "prompt": f"held out prompt {tag}{i}?", "task": "length",
                           "split": "eval"})
            if i and i % 20000 == 0:
                log(f"queued {i}/{n}")
        done["queued"] = time.monotonic() - started
    done["sent"] = time.monotonic()


def _check_alive(worker: subprocess.Popen[bytes], log_path: Path) -> None:
    """Fail at once, with the worker's last lines, when it exited (e.g. refused at start-up)."""
    if worker.poll() is not None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"worker exited with {worker.returncode}: {' | '.join(tail)}")


def _warm_up(settings: Settings, timeout_s: float, worker: subprocess.Popen[bytes],
             log_path: Path) -> float:
    """Seconds from launch until the worker has consumed and committed one prompt per policy on
    every partition: from then on the group only consumes."""
    group = group_id(settings, ["rollout"])
    start = time.monotonic()
    _produce(settings, POLICIES, {}, tag="warm-up ")
    while time.monotonic() - start < timeout_s:
        _check_alive(worker, log_path)
        rows = [r for r in admin.consumer_lag(settings, group)
                if r.topic == settings.topic("interactions")]
        if len(rows) == settings.partitions and sum(r.lag for r in rows) == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"worker not consuming within {timeout_s} s")


def _measure(settings: Settings, n: int, timeout_s: float,
             worker: subprocess.Popen[bytes], log_path: Path) -> dict[str, float | int]:
    group = group_id(settings, ["rollout"])
    done: dict[str, float] = {}
    start = time.monotonic()
    producer = threading.Thread(target=_produce, args=(settings, n, done), daemon=True)
    producer.start()
    max_lag, last_log, last_look, last_lag = 0, start, start, None
    steps: list[Commit] = []
    while time.monotonic() - start < timeout_s:
        _check_alive(worker, log_path)
        lag = _lag(settings, group)
        now = time.monotonic()
        if lag is not None:
            max_lag = max(max_lag, lag)
            if "sent" in done and lag != last_lag:
                steps.append(Commit(now, lag, now - last_look))
            last_lag = lag
            if "sent" in done and lag == 0:
                end = drained_at(steps)
                return {"events": n, "events_per_s": round(n / (end - start), 1),
                        "max_lag": max_lag, "drain_s": round(end - done["sent"], 2),
                        "produce_per_s": round(n / done["queued"], 1)}
        if now - last_log > 5:
            log(f"lag {lag} after {now - start:.0f} s")
            last_log = now
        last_look = now
        # Once everything is sent, each commit is seen within a tenth of a second, which
        # `drained_at` needs; before, looks stay rare (each opens an admin client).
        time.sleep(0.1 if "sent" in done else 0.5)
    raise TimeoutError(f"not drained within {timeout_s} s (max lag {max_lag})")


class Commit(NamedTuple):
    """A new committed lag, seen while draining: when, and how long since the look before
    (the commit happened in between)."""

    seen: float
    lag: int
    gap: float


def drained_at(steps: list[Commit], precise_s: float = 0.25) -> float:
    """When the last event was consumed, from the commits seen while draining (the last one
    at lag 0). Offsets are committed once a second, so the first look at lag 0 comes up to a
    second after the consumer finished (6% of a 17 s run): two commits before it, each seen
    within `precise_s` of happening, give the drain's rate, and the last lag over that rate
    the finish. Without them, the first look at lag 0."""
    zero_at = steps[-1].seen
    if len(steps) < 3 or max(steps[-3].gap, steps[-2].gap) > precise_s:
        return zero_at
    a, b = steps[-3], steps[-2]
    rate = (a.lag - b.lag) / (b.seen - a.seen) if b.seen > a.seen else 0.0
    return min(zero_at, b.seen + b.lag / rate) if rate > 0 else zero_at


def cleanup(settings: Settings) -> None:
    """Delete a benchmark namespace: its topics, its group and its Redis keys."""
    admin.delete_topics(settings, admin.list_topics(settings, settings.topic_prefix))
    admin.delete_groups(settings, settings.app_id)
    r = redis.Redis.from_url(settings.redis_url)
    keys = list(r.scan_iter(match=f"{settings.redis_prefix}*", count=5000))
    for i in range(0, len(keys), 5000):
        r.delete(*keys[i:i + 5000])


def _redis_used_mb() -> float:
    info = redis.Redis.from_url(Settings().redis_url).info("memory")
    return float(info["used_memory"]) / 2**20


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phase(n: int, partitions: int, timeout_s: float, bare: bool) -> dict[str, float | int]:
    """One measured run in a fresh namespace: the rollout stage, or the bare Faust floor."""
    tag = f"bench{uuid.uuid4().hex[:8]}"
    # The rollout worker refuses to start without a base model (preflight); held-out prompts
    # never reach it, so the tiny one costs only its load at start-up.
    base = build_tiny_model(Settings().data_dir / "bench" / "tiny")
    settings = Settings(**{**Settings().model_dump(), "topic_prefix": f"{tag}.", "app_id": tag,
                           "redis_prefix": f"{tag}:", "partitions": partitions,
                           "base_model": base})
    admin.create_topics(settings)
    command = (["-m", "loadtests.pipeline", "--bare-worker"] if bare
               else ["-m", "streams.cli", "worker", "--stages", "rollout"])
    log_path = Path(f"/tmp/{tag}-worker.log")
    with open(log_path, "wb") as out:
        worker = subprocess.Popen([sys.executable, *command],
                                  env={**os.environ, **settings_env(settings)}, cwd=REPO_ROOT,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        log(f"{'bare Faust agent' if bare else 'rollout stage'}: {n} events, {partitions} "
            f"partitions, worker pid {worker.pid}")
        ready_s = _warm_up(settings, timeout_s, worker, log_path)
        cpu_s = _cpu_s(worker.pid)
        figures = _measure(settings, n, timeout_s, worker, log_path)
        return {**figures, "ready_s": round(ready_s, 2),
                "worker_cpu_us_per_event": round((_cpu_s(worker.pid) - cpu_s) / n * 1e6, 1)}
    finally:
        worker.terminate()
        worker.wait(60)
        cleanup(settings)


def bare_worker() -> None:
    """Faust's floor: the stage's app settings and batching, and nothing else per batch."""
    import faust

    from streams.app import faust_app, topic
    from workers.pipeline.units import STREAM_WINDOW_S

    settings = Settings()
    app = faust_app(settings, group_id(settings, ["rollout"]))

    async def drain(stream: faust.StreamT) -> AsyncIterator[None]:
        async for _events in stream.take_events(settings.stream_batch,  # type: ignore[attr-defined]
                                                within=STREAM_WINDOW_S):
            yield None

    app.agent(topic(app, settings, "interactions"), name="bare")(drain)
    faust.Worker(app, loglevel="WARNING", redirect_stdouts=False).execute_from_commandline()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="floor and stage phases, alternating; medians are reported")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    args = parser.parse_args(argv)
    if args.bare_worker:
        bare_worker()
        return 0
    redis_mb = _redis_used_mb()
    if redis_mb > REDIS_WARN_MB:
        log(f"warning: Redis holds {redis_mb:.0f} MB; its snapshots (save 60 10000) fork and "
            "write all of it after the stage's writes, which only the stage's phases pay")
    floors, stages = [], []
    for i in range(args.repeats):  # alternating, so a drift of the machine hits both sides
        floors.append(_phase(args.events, args.partitions, args.timeout, bare=True))
        log(f"floor {i + 1}/{args.repeats}: {floors[-1]}")
        stages.append(_phase(args.events, args.partitions, args.timeout, bare=False))
        log(f"stage {i + 1}/{args.repeats}: {stages[-1]}")
    print(orjson.dumps({**summarise(floors, stages), "redis_used_mb": round(redis_mb, 1)}
                       ).decode())
    return 0


def summarise(floors: list[dict[str, float | int]],
              stages: list[dict[str, float | int]]) -> dict[str, object]:
    """The median stage run's figures beside the floor's median, and every run's rate."""
    floor, stage = _median_run(floors), _median_run(stages)
    rates = [float(r["events_per_s"]) for r in stages]
    floor_rates = [float(r["events_per_s"]) for r in floors]
    return {**stage, "floor_events_per_s": floor["events_per_s"],
            "floor_ready_s": floor["ready_s"],
            "floor_worker_cpu_us_per_event": floor["worker_cpu_us_per_event"],
            "ratio_to_floor": round(float(stage["events_per_s"])
                                    / float(floor["events_per_s"]), 3),
            "repeats": len(stages), "runs_events_per_s": rates,
            "floor_runs_events_per_s": floor_rates,
            "runs_ratio_to_floor": [round(a / b, 3) for a, b in zip(rates, floor_rates,
                                                                    strict=True)]}


def _median_run(runs: list[dict[str, float | int]]) -> dict[str, float | int]:
    """The run with the median rate (the lower middle one of an even count)."""
    ranked = sorted(runs, key=lambda r: float(r["events_per_s"]))
    return ranked[(len(ranked) - 1) // 2]


if __name__ == "__main__":
    sys.exit(main())
