"""`lorastream dead-letters list|replay`: what the stages could not process, and sending it
back once the cause is fixed (`streams/sdk/deadletters.py`)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime

import orjson

from infra.settings import Settings

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dead-letters", help="list or replay dead letters")
    verbs = p.add_subparsers(dest="dl_command", required=True)
    for verb, handler, text in (("list", cmd_list, "dead letters matching the filters"),
                                ("replay", cmd_replay, "re-send their original bytes to the "
                                                       "stage's input topic")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("--stage", help="only this stage's letters")
        v.add_argument("--reason", help="only letters whose error type or message contains this")
        v.add_argument("--policy", help="only this policy's letters")
        v.add_argument("--since", type=when, help="unix seconds, ISO 8601, or ago: 30m, 2h, 1d")
        v.add_argument("--until", type=when, help="as --since")
        v.add_argument("--json", action="store_true", help="one JSON object per line")
        v.set_defaults(handler=handler)
        if verb == "replay":
            v.add_argument("--dry-run", action="store_true", help="only say what would be sent")


def when(text: str, now: float | None = None) -> float:
    """A point in time from unix seconds, ISO 8601, or a duration ago (`90s`, `30m`, `2h`)."""
    ago = _AGO.match(text.strip())
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _UNIT_S[ago[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from exc


def _found(args: argparse.Namespace, settings: Settings) -> list:
    from streams.sdk.deadletters import LetterFilter, read_letters

    return read_letters(settings, LetterFilter(stage=args.stage, reason=args.reason,
                                               policy=args.policy, since=args.since,
                                               until=args.until))


def _show(found: list, as_json: bool) -> None:
    for f in found:
        row = f.row()
        if as_json:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
            continue
        stamp = datetime.fromtimestamp(float(row["ts"])).isoformat(timespec="seconds")
        print(f"{stamp}  {row['stage']:<9} {row['policy_id'] or '-':<16} "
              f"{row['error_type']}: {str(row['error'])[:100]}")


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    found = _found(args, settings)
    _show(found, args.json)
    print(f"{len(found)} dead letter(s)", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from streams.agents import STAGES
    from streams.sdk.deadletters import replay

    found = _found(args, settings)
    if args.dry_run:
        _show(found, args.json)
        print(f"would replay {len(found)} dead letter(s)", file=sys.stderr)
        return 0
    report = replay(settings, found, {name: s.reads for name, s in STAGES.items()})
    for why in report.skipped:
        print(f"skipped {why}", file=sys.stderr)
    print(f"replayed {report.sent} dead letter(s)", file=sys.stderr)
    return 1 if report.skipped else 0
