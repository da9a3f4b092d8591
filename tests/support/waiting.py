"""Small test utilities shared by unit and integration tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | Literal[False] | None], timeout: float, interval: float = 0.05,
    message: str = "",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that (so never the
    False or None of `cond and value` / `value or None` predicates).

    Tests synchronise on observable conditions, never on fixed sleeps: this returns as soon as
    the condition holds and fails with a clear message (plus the last value seen) otherwise.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(interval)


async def wait_for_async(predicate: Callable[[], Any | Awaitable[Any]], timeout: float,
                         what: str, interval: float = 0.02) -> Any:
    """`wait_for` for tests that share an event loop with the code under test: polls without
    blocking the loop. `predicate` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)
