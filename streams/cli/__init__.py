"""The `lorastream` command line: `main` is the console script's entry point."""

from streams.cli.main import main

__all__ = ["main"]
