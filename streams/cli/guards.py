"""`lorastream resume POLICY` and `lorastream paused`: the operator's side of training pauses.

A policy is paused by the update stage when a step is rejected (non-finite loss or gradient,
exploding gradient); its rollouts and updates are dead-lettered until someone has looked at why
and resumes it here.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from infra.settings import Settings
from workers.pipeline import guards
from workers.pipeline.context import StageContext


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="resume training of a paused policy")
    p.add_argument("policy_id")
    p.set_defaults(handler=cmd_resume)
    p = sub.add_parser("paused", help="list paused policies with the reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_paused)


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    ctx = StageContext.create(settings)
    event = guards.resume(ctx, args.policy_id)
    if event is not None:
        ctx.catalog.announce(event)  # a Redis rebuild replays it: the pause stays lifted
        print(f"{args.policy_id}: resumed")
        return 0
    print(f"{args.policy_id}: was not paused", file=sys.stderr)
    return 1


def cmd_paused(args: argparse.Namespace, settings: Settings) -> int:
    ctx = StageContext.create(settings)
    rows = guards.paused_policies(ctx)
    if args.json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
    else:
        for row in rows:
            print(f"{row['policy_id']}\t{row['stage']}\t{row['reason']}")
    return 0
