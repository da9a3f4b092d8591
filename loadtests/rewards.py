"""The reward stage with an HTTP judge that takes 50 ms per call, next to an in-process reward.

`python -m loadtests.rewards --groups 20000 --json`

Two kinds of phase, each in a fresh namespace (topics, group, Redis prefix), with N rollout
groups (G completions each, spread over many policies) on a real `rollouts` topic and one
`lorastream worker --stages reward` process consuming them, run in ABBA order over `--rounds`
(A B, then B A: slow drift of a shared machine falls on both kinds alike):

1. in process: the groups name the built-in `length` reward;
2. HTTP: they name `judge`, a `LORASTREAM_REWARD_ENDPOINTS` entry served by
   `python -m workers.reference.judge --delay-ms 50` in its own process (every call waits
   50 ms, then scores like `length`).

The groups are on the topic before the worker starts; the clock runs from the worker group's
first commit (it has joined and taken its first batches) until its committed offsets reach the
log end, and the rate is the groups committed in between over that time.
`groups_per_s` is the HTTP phases' groups over their time, `in_process_groups_per_s` the
in-process phases', `ratio` the first over the second. `p99_ms` is the largest of the judge
phases' 99th percentile of a call's latency (from its unit's start to the judge's answer, so
call-slot waits and retries included: every group of the call waited that long), read from the
worker's `lorastream_reward_seconds` histogram and interpolated within its bucket as Prometheus
does. Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer

from infra import admin
from infra.settings import REPO_ROOT, RewardEndpoint, Settings, settings_env
from loadtests.pipeline import cleanup
from schemas.codec import encode_event
from schemas.events import Completion, InteractionLogged, RolloutGenerated
from streams.app import group_id
from streams.sdk.producer import kafka_client_config

DELAY_MS = 50.0


def log(msg: str) -> None:
    print(f"[rewards-bench] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _groups(n: int, reward: str, size: int, policies: int) -> list[bytes]:
    out = []
    for i in range(n):
        policy = f"bench-{i % policies}"
        inter = InteractionLogged(policy_id=policy, prompt=f"question {i}?", task=reward,
                                  task_params={"target_chars": 4})
        completions = [Completion(text="x" * ((i + k) % 9), token_ids=[5] * 8,
                                  logprobs=[-1.0] * 8) for k in range(size)]
        out.append(encode_event(RolloutGenerated(policy_id=policy, interaction=inter,
                                                 revision=0, prompt_ids=list(range(12)),
                                                 completions=completions, temperature=1.0)))
    return out


def _lag(settings: Settings, group: str) -> int | None:
    rows = [r for r in admin.consumer_lag(settings, group)
            if r.topic == settings.topic("rollouts")]
    return sum(r.lag for r in rows) if rows else None


def _produce(settings: Settings, values: list[bytes]) -> float:
    """Put every group on the topic before the worker starts; returns the seconds it took."""
    producer = KafkaProducer(**kafka_client_config(settings), linger_ms=20,
                             batch_size=512 * 1024, acks=1)
    topic = settings.topic("rollouts")
    start = time.monotonic()
    for i, value in enumerate(values):
        producer.send(topic, key=f"bench-{i % 64}".encode(), value=value)
    producer.flush()
    producer.close()
    return time.monotonic() - start


def _drain(settings: Settings, n: int, group: str, timeout_s: float) -> dict[str, float]:
    """The backlog's drain rate: from the first commit the worker makes (it has joined and
    taken its first batches) to the commit that reaches the log end, groups over seconds."""
    start = time.monotonic()
    first: tuple[float, int] | None = None
    last = start
    while time.monotonic() - start < timeout_s:
        lag = _lag(settings, group)
        now = time.monotonic()
        if lag is not None and first is None and lag < n:
            first = (now, lag)
        if lag == 0 and first is not None:
            t0, backlog = first
            if backlog == 0:  # drained before the first look: the whole run is all we have
                t0, backlog = start, n
            return {"seconds": now - t0, "measured_groups": backlog}
        if now - last > 5:
            log(f"lag {lag} after {now - start:.0f} s")
            last = now
        time.sleep(0.1)
    raise TimeoutError(f"not drained within {timeout_s} s")


def _p99_ms(metrics_url: str, reward: str) -> float | None:
    """99th percentile of `lorastream_reward_seconds{reward=...}` from the worker's /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("lorastream_reward_seconds_bucket") and f'reward="{reward}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le),
                            float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    buckets.sort()
    rank = 0.99 * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower * 1000
            return (lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)) * 1000
        lower, below = upper, count
    return None


def _phase(values: list[bytes], reward: str, endpoint: RewardEndpoint | None,
           partitions: int, timeout_s: float) -> dict[str, Any]:
    tag = f"rbench{uuid.uuid4().hex[:8]}"
    base = {**Settings().model_dump(), "topic_prefix": f"{tag}.", "app_id": tag,
            "redis_prefix": f"{tag}:", "partitions": partitions,
            "reward_endpoints": {"judge": endpoint} if endpoint else {}}
    settings = Settings(**base)
    admin.create_topics(settings)
    produced = _produce(settings, values)
    port = _free_port()
    log_path = Path(f"/tmp/{tag}-worker.log")
    with open(log_path, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--stages", "reward",
             "--metrics-port", str(port)],
            env={**os.environ, **settings_env(settings)}, cwd=REPO_ROOT, stdout=out,
            stderr=subprocess.STDOUT)
    group = group_id(settings, ["reward"])
    try:
        log(f"{reward}: {len(values)} groups on the topic (produced in {produced:.1f} s), "
            f"worker pid {worker.pid} (log {log_path})")
        run = _drain(settings, len(values), group, timeout_s)
        p99 = _p99_ms(f"http://127.0.0.1:{port}/metrics", reward)
        return {"groups_per_s": run["measured_groups"] / run["seconds"], "p99_ms": p99, **run}
    finally:
        worker.terminate()
        worker.wait(60)
        cleanup(settings)




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=20_000, help="groups per phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both phases, in ABBA order (drift cancels)")
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--policies", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=DELAY_MS)
    parser.add_argument("--groups-per-call", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true", help="(always on) end with JSON")
    args = parser.parse_args(argv)
    log(f"building {args.groups} rollout groups of {args.group_size} per phase")
    values = {"length": _groups(args.groups, "length", args.group_size, args.policies),
              "judge": _groups(args.groups, "judge", args.group_size, args.policies)}
    port = _free_port()
    judge = subprocess.Popen([sys.executable, "-m", "workers.reference.judge", "--port",
                              str(port), "--delay-ms", str(args.delay_ms)], cwd=REPO_ROOT)
    endpoint = RewardEndpoint(url=f"http://127.0.0.1:{port}/score",
                              max_groups_per_call=args.groups_per_call,
                              max_concurrency=args.concurrency)
    runs: dict[str, list[dict[str, Any]]] = {"length": [], "judge": []}
    try:
        _wait_port(port)
        for r in range(args.rounds):
            for reward in (("length", "judge") if r % 2 == 0 else ("judge", "length")):
                run = _phase(values[reward], reward, endpoint if reward == "judge" else None,
                             args.partitions, args.timeout)
                log(f"round {r + 1} {reward}: {run}")
                runs[reward].append(run)
    finally:
        judge.terminate()
        judge.wait(30)

    def rate(reward: str) -> float:
        done = runs[reward]
        return sum(x["measured_groups"] for x in done) / sum(x["seconds"] for x in done)

    def p99(reward: str) -> float | None:
        got = [x["p99_ms"] for x in runs[reward] if x["p99_ms"] is not None]
        return round(max(got), 1) if got else None

    result = {
        "groups": args.groups,
        "groups_per_s": round(rate("judge"), 1),
        "p99_ms": p99("judge"),
        "in_process_groups_per_s": round(rate("length"), 1),
        "ratio": round(rate("judge") / rate("length"), 3),
        "rounds": args.rounds, "judge_delay_ms": args.delay_ms,
        "groups_per_call": args.groups_per_call, "in_process_p99_ms": p99("length"),
        "per_round": {k: [round(x["measured_groups"] / x["seconds"], 1) for x in v]
                      for k, v in runs.items()},
    }
    print(orjson.dumps(result).decode())
    return 0


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the judge did not listen on {port}")


if __name__ == "__main__":
    sys.exit(main())
