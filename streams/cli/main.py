"""`lorastream` command line: one entry point, settings read from the environment here only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from infra.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorastream",
        description="LoRA RL post-training and serving as one Kafka/Faust pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from streams.cli import catalog as catalog_cli
    from streams.cli import commands
    from streams.cli import deadletters as dead_letter_cli
    from streams.cli import engine as serving_cli
    from streams.cli import gateway as gateway_cli
    from streams.cli import guards as guard_cli
    from streams.cli import infra as infra_cli

    infra_cli.register(sub)
    commands.register(sub)
    catalog_cli.register(sub)
    guard_cli.register(sub)
    serving_cli.register(sub)
    dead_letter_cli.register(sub)
    gateway_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for noisy in ("kafka", "aiokafka", "faust", "mode"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    handler: Handler = args.handler
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
