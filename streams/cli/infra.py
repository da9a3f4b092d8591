"""`lorastream infra up|status|down` and `lorastream lag`: local services and consumer lag.

`infra up` is what the README, `infra/dev.sh` and CI run before anything else; it is idempotent
(a second run only checks and says "running"), so scripts can call it unconditionally.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from infra import admin, cluster, services
from infra.services import ServiceError, ServiceStatus
from infra.settings import Settings


def register(sub: Any) -> None:
    """Add the `infra` and `lag` subcommands to the top-level subparsers."""
    infra = sub.add_parser("infra", help="start/inspect/stop the local Kafka broker and Redis")
    verbs = infra.add_subparsers(dest="infra_command", required=True)
    up = verbs.add_parser("up", help="ensure Redis and Kafka answer; create the pipeline topics")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per service")
    up.add_argument("--brokers", type=int, default=1,
                    help="1: one local broker; N > 1: an N-node KRaft cluster (replication "
                         "factor N, min.insync.replicas N-1) from the first bootstrap port on")
    up.set_defaults(handler=cmd_up)
    status = verbs.add_parser("status", help="what runs where")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)
    down = verbs.add_parser("down", help="stop the services `infra up` started (not external ones)")
    down.set_defaults(handler=cmd_down)

    lag = sub.add_parser("lag", help="consumer-group lag per partition")
    lag.add_argument("--group", help="only this consumer group")
    lag.add_argument("--json", action="store_true", help="machine-readable output")
    lag.add_argument(
        "--all-topics", action="store_true", help="include topics without the topic prefix"
    )
    lag.add_argument("--watch", type=float, metavar="INTERVAL",
                     help="refresh every INTERVAL seconds; rates over the last 30 s of samples")
    lag.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    lag.add_argument("--sample", type=float, default=1.0, metavar="SECONDS",
                     help="one-shot: measure rates over two samples this far apart "
                          "(default 1; 0 = one sample, no rates)")
    lag.set_defaults(handler=cmd_lag)


def _quiet(args: argparse.Namespace) -> None:
    """kafka-python logs every connection at INFO; keep command output readable unless -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _describe(st: ServiceStatus) -> str:
    where = f"pid {st.pid}" if st.pid else "not started by lorastream"
    note = {"running": " (already running)", "external": " (external; left alone)"}
    line = f"{st.name:<6} {st.state:<9} {st.address}  [{where}]{note.get(st.state, '')}"
    return line + (f"\n       log: {st.log}" if st.log and st.state == "started" else "")


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Ensure Redis and Kafka answer, then create the pipeline topics (idempotent)."""
    _quiet(args)
    t0 = time.monotonic()
    brokers = getattr(args, "brokers", 1)
    try:
        print(_describe(services.ensure_redis(settings, timeout=args.timeout)), flush=True)
        if brokers > 1:
            settings = cluster.ensure_cluster(settings, brokers, timeout=max(args.timeout, 180))
            print(f"kafka  cluster   {brokers} brokers, replication factor {brokers}, "
                  f"min.insync.replicas {max(1, brokers - 1)}\n"
                  f"       export LORASTREAM_BOOTSTRAP_SERVERS={settings.bootstrap_servers}",
                  flush=True)
        else:
            print(_describe(services.ensure_kafka(settings, timeout=args.timeout)), flush=True)
        created = admin.create_topics(settings)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = len(admin.list_topics(settings, settings.topic_prefix))
    print(
        f"topics {len(created)} created, {total} with prefix {settings.topic_prefix!r} "
        f"({settings.partitions} partitions by default)"
    )
    print(f"infra up in {time.monotonic() - t0:.1f} s (data: {settings.data_dir})")
    return 0


def _status_rows(settings: Settings) -> dict[str, Any]:
    kafka, redis = services.kafka_status(settings), services.redis_status(settings)
    topics: int | None = None
    if kafka.answering:
        try:
            topics = len(admin.list_topics(settings, settings.topic_prefix))
        except Exception:  # status must report, not crash, on a half-up broker
            topics = None
    return {"kafka": kafka.as_dict(), "redis": redis.as_dict(), "topics": topics,
            "topic_prefix": settings.topic_prefix, "data_dir": str(settings.data_dir)}


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print what runs where; exit 0 only when both services answer."""
    _quiet(args)
    rows = _status_rows(settings)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'service':<8}{'state':<10}{'answering':<11}{'pid':<9}address")
        for name in ("redis", "kafka"):
            r = rows[name]
            print(f"{name:<8}{r['state']:<10}{'yes' if r['answering'] else 'no':<11}"
                  f"{r['pid'] or '-'!s:<9}{r['address']}")
        topics = rows["topics"] if rows["topics"] is not None else "?"
        print(f"topics with prefix {settings.topic_prefix!r}: {topics}")
    return 0 if rows["kafka"]["answering"] and rows["redis"]["answering"] else 1


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    """Stop only what `infra up` started (pid files); external services keep running."""
    _quiet(args)
    running = cluster.running_nodes(settings)
    cluster.stop_nodes(running)
    for node in running:
        print(f"kafka  node {node.node_id} ({node.address}) stopped")
    for name, stop, status in (
        ("kafka", services.stop_kafka, services.kafka_status),
        ("redis", services.stop_redis, services.redis_status),
    ):
        if stop(settings):
            print(f"{name:<6} stopped")
        elif status(settings).answering:
            print(f"{name:<6} external (not started by lorastream); left running")
        else:
            print(f"{name:<6} not running")
    return 0


def cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    """Print committed offset, log end, lag, consumption rate and time to drain per partition.

    One-shot output is a JSON list (`--json`) or a table; `--watch` prints one table (or one JSON
    line `{"ts", "rows"}`) per refresh, with rates from the samples it has taken so far.
    """
    _quiet(args)
    watch = getattr(args, "watch", None)
    if watch:
        return _watch_lag(args, settings, watch)
    rows = admin.sample_lag(settings, group=args.group, all_topics=args.all_topics,
                            interval_s=getattr(args, "sample", 0.0))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(_lag_table(rows, args.group))
    return 0


def _watch_lag(args: argparse.Namespace, settings: Settings, interval: float) -> int:
    """Refresh until interrupted (or `--count` refreshes); a tty gets a cleared screen."""
    tracker = admin.LagTracker()
    clear = sys.stdout.isatty() and not args.json
    done = 0
    try:
        while args.count is None or done < args.count:
            if done:
                time.sleep(interval)  # the refresh period the operator asked for
            rows = tracker.add(admin.consumer_lag(settings, group=args.group,
                                                  all_topics=args.all_topics))
            if args.json:
                print(json.dumps({"ts": time.time(), "rows": [r.as_dict() for r in rows]}),
                      flush=True)
            else:
                head = "\x1b[2J\x1b[H" if clear else ""
                print(f"{head}{time.strftime('%H:%M:%S')}  every {interval:g} s\n"
                      f"{_lag_table(rows, args.group)}\n", flush=True)
            done += 1
    except KeyboardInterrupt:
        pass
    return 0


def _lag_table(rows: list[admin.LagRow], group: str | None) -> str:
    if not rows:
        return "no committed offsets" + (f" for group {group!r}" if group else "")
    gw = max(len("GROUP"), *(len(r.group) for r in rows))
    tw = max(len("TOPIC"), *(len(r.topic) for r in rows))
    lines = [f"{'GROUP':<{gw}}  {'TOPIC':<{tw}}  {'PART':>4}  {'COMMITTED':>10}  {'END':>10}  "
             f"{'LAG':>8}  {'RATE/s':>8}  {'DRAIN':>8}"]
    for r in rows:
        rate = "-" if r.rate is None else f"{r.rate:.1f}"
        lines.append(f"{r.group:<{gw}}  {r.topic:<{tw}}  {r.partition:>4}  {r.committed:>10}  "
                     f"{r.end_offset:>10}  {r.lag:>8}  {rate:>8}  {_drain(r):>8}")
    lines.append(f"total lag: {sum(r.lag for r in rows)}")
    return "\n".join(lines)


def _drain(row: admin.LagRow) -> str:
    """Time to drain for people: '-' unknown (one sample), 'never' when lag is not shrinking."""
    if row.rate is None:
        return "-"
    if row.drain_s is None:
        return "never"
    secs = round(row.drain_s)
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"
