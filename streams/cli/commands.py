"""Handlers of the pipeline subcommands (`worker`, `produce`, `watch`, `schemas`, `demo`,
`dashboard`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from infra.settings import Settings
from schemas.events import json_schemas


def register(sub: argparse._SubParsersAction) -> None:
    from streams.agents import STAGES

    p = sub.add_parser("worker", help="run pipeline stages (a Faust worker)")
    p.add_argument("--stages", default="all",
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--loglevel", default="WARNING")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0 = off)")
    p.add_argument("--lag-interval", type=float, default=15.0,
                   help="seconds between consumer-lag samples for /metrics")
    p.add_argument("--supervise", action="store_true",
                   help="run the worker as a child process and restart it whenever it exits "
                        "without being asked to (crash, kill, exit 75), with backoff")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("produce", help="push interaction logs (JSON lines) to the pipeline")
    p.add_argument("file", nargs="?", default="-", help="JSONL file, or - for stdin")
    p.set_defaults(handler=cmd_produce)

    p = sub.add_parser("watch", help="stream a topic's events as JSON lines")
    p.add_argument("topic", nargs="?", default="evaluations",
                   help="evaluations (default), promotions, exports, dead-letters, ...")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--policy", help="only this policy's events")
    p.add_argument("--max", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("schemas", help="write the JSON Schema of every event")
    p.add_argument("--out", type=Path, default=Path("schemas/json"))
    p.set_defaults(handler=cmd_schemas)

    p = sub.add_parser("demo", help="the main job: train 3 policies end to end and report")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--steps", type=int, default=None,
                   help="training interactions per policy (default: 128 tiny, 32 smollm2)")
    p.add_argument("--arch", default="llama",
                   help="tiny base family: llama, qwen3, mixtral, qwen3_moe, gpt_oss, "
                        "deepseek_v3, deepseek_v32, glm_moe_dsa")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="smollm2: the pretrained SmolLM2-135M-Instruct with readable tasks")
    p.add_argument("--keep", action="store_true", help="keep the demo's topics afterwards")
    p.add_argument("--objective", choices=("grpo", "sft", "dpo"), default="grpo",
                   help="what the three policies train with (and on which kind of logs)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("dashboard", help="web dashboard for operators (lag, training, serving)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--refresh", type=float, default=2.0,
                   help="seconds between lag samples (and page refreshes)")
    p.set_defaults(handler=cmd_dashboard)


def parse_stages(value: str) -> list[str]:
    from streams.agents import STAGES

    return list(STAGES) if value == "all" else [s.strip() for s in value.split(",") if s.strip()]


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import group_id, run_worker
    stages = parse_stages(args.stages)
    if getattr(args, "supervise", False):
        from streams.cli.supervisor import supervise

        return supervise([sys.executable, "-m", "streams.cli", "worker", "--stages",
                          ",".join(stages), "--loglevel", args.loglevel, "--metrics-port",
                          str(args.metrics_port), "--lag-interval", str(args.lag_interval)])
    if getattr(args, "metrics_port", 0):
        from streams.ops import metrics

        metrics.serve(args.metrics_port, settings, group=group_id(settings, stages),
                      lag_interval_s=args.lag_interval)
    from workers.pipeline.preflight import EX_CONFIG, Misconfigured

    try:
        run_worker(settings, stages, loglevel=args.loglevel)
    except (Misconfigured, ValueError) as exc:
        print(f"lorastream worker: {exc}", file=sys.stderr, flush=True)
        return EX_CONFIG
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from streams.sdk.producer import InteractionProducer, ProduceError

    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    try:
        with stream, InteractionProducer(settings) as producer:
            report = producer.send_many(stream)
    except ProduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for number, reason in report.rejected:
        print(f"line {number}: rejected: {reason}", file=sys.stderr)
    print(f"sent {report.sent}, rejected {len(report.rejected)}", file=sys.stderr)
    return 1 if report.rejected else 0


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from streams.sdk.watch import tail

    count = 0
    try:
        for event in tail(settings, args.topic, from_beginning=args.from_beginning,
                          timeout_s=args.timeout):
            if args.policy and event.get("policy_id") != args.policy:
                continue
            sys.stdout.write(orjson.dumps(event).decode() + "\n")
            sys.stdout.flush()
            count += 1
            if args.max and count >= args.max:
                break
    except KeyboardInterrupt:
        pass
    return 0


def cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        path = args.out / f"{name}.v1.json"
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.cli.demo import run_demo
    from streams.cli.demo_specs import SMOLLM2, tiny_spec
    from workers.models.tiny import ARCHES

    if args.model == "smollm2":
        if args.objective != "grpo":
            print("--objective sft|dpo trains the tiny bases' policies; SmolLM2's demo is GRPO",
                  file=sys.stderr)
            return 2
        spec = SMOLLM2
    elif args.arch in ARCHES:
        spec = tiny_spec(args.arch)
    else:
        print(f"unknown --arch {args.arch!r}; known: {', '.join(ARCHES)}", file=sys.stderr)
        return 2
    return run_demo(settings, steps=args.steps, as_json=args.json, keep=args.keep, spec=spec,
                    objective=args.objective)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from streams.ops.dashboard import run_dashboard

    run_dashboard(settings, host=args.host, port=args.port, refresh_s=args.refresh)
    return 0
