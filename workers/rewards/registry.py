"""Reward functions by name: the built-ins, installed plugins, explicit `module:function`
settings and HTTP judges, all behind one `Rewards` table a process builds once at start-up.

Where a name comes from, in order (a name defined twice with different targets is a
misconfiguration and stops the process at start-up with one message):

1. the built-ins (`BUILTINS`), entry points of the group `lorastream.rewards` like any plugin's
   (pyproject.toml declares them too, so an installed lorastream lists them);
2. every installed distribution's entry points in that group: a plugin package declares
   `[project.entry-points."lorastream.rewards"] my-reward = "my_pkg.rewards:score"`;
3. `LORASTREAM_REWARD_PLUGINS`: `{"name": "module:function"}`, for code that is not packaged;
4. `LORASTREAM_REWARD_ENDPOINTS`: HTTP judges (`workers/rewards/http.py`).

A reward declares its version (`declare(version=...)`, or plain `version` / `batched` /
`inline` attributes on the function, so a plugin need not import lorastream); the version is
recorded with every reward and in each revision's provenance, so bump it whenever the scoring
changes. A function scores one completion (`fn(interaction, completion) -> float`) or, with
`batched`, a whole group (`fn(interaction, completions) -> list[float]`); either may be
`async def`. Synchronous plugins run in a thread (their cost is unknown: the event loop must
stay free); built-ins and functions declared `inline` run on the loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, TypeVar

from prometheus_client import Histogram

from infra.settings import Settings
from schemas.errors import PoisonEventError, RetryableError
from schemas.events import InteractionLogged

GROUP = "lorastream.rewards"
BUILTINS: dict[str, str] = {
    "reference": "workers.rewards.functions:reference_reward",
    "length": "workers.rewards.functions:length_reward",
    "feedback": "workers.rewards.functions:feedback_reward",
}
"""The built-in rewards, as entry point values (`workers/rewards/functions.py`)."""

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.055, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 30)
SCORE_SECONDS = Histogram(
    "lorastream_reward_seconds",
    "Time from the start of a unit's scoring to its groups' rewards, by reward name: one "
    "observation per HTTP call (every group of a call has its latency: call-slot waits and "
    "retries included), or per unit for an in-process reward.",
    ["reward"], buckets=LATENCY_BUCKETS,
)

F = TypeVar("F", bound=Callable[..., Any])
Group = tuple[InteractionLogged, Sequence[str]]
"""One rollout group to score: the interaction and its completions' texts."""


class RewardConfigError(ValueError):
    """A reward that cannot be loaded or is declared wrong: the process must not start."""


def declare(version: int, *, batched: bool = False, inline: bool = False) -> Callable[[F], F]:
    """Mark `fn` as a reward of `version`; `batched`: it scores a whole group at once;
    `inline`: it is microseconds of pure Python and may run on the event loop."""
    def mark(fn: F) -> F:
        fn.version = version  # type: ignore[attr-defined]
        fn.batched = batched  # type: ignore[attr-defined]
        fn.inline = inline  # type: ignore[attr-defined]
        return fn
    return mark


class Reward(Protocol):
    """What the stages need of a reward, whatever it is backed by."""

    name: str
    version: int
    source: str

    async def score_many(self, groups: Sequence[Group]) -> list[list[float] | Exception]:
        """Each group's rewards, or the exception that group failed with (poison: the event's
        fault; retryable: transient). Never blocks the event loop."""
        ...


@dataclass
class FunctionReward:
    """A Python function (built-in or plugin) as a `Reward`."""

    name: str
    version: int
    source: str
    fn: Callable[..., Any]
    batched: bool = False
    inline: bool = False
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.fn)

    async def score_many(self, groups: Sequence[Group]) -> list[list[float] | Exception]:
        if self.is_async:
            return list(await asyncio.gather(*(self._one_async(g) for g in groups)))
        if self.inline:
            return [self._one_sync(g) for g in groups]
        return await asyncio.to_thread(lambda: [self._one_sync(g) for g in groups])

    def _one_sync(self, group: Group) -> list[float] | Exception:
        interaction, texts = group
        try:
            if self.batched:
                out = self.fn(interaction, list(texts))
            else:
                out = [self.fn(interaction, t) for t in texts]
            return checked(self.name, out, len(texts))
        except Exception as exc:
            return exc

    async def _one_async(self, group: Group) -> list[float] | Exception:
        interaction, texts = group
        try:
            if self.batched:
                out = await self.fn(interaction, list(texts))
            else:
                out = await asyncio.gather(*(self.fn(interaction, t) for t in texts))
            return checked(self.name, out, len(texts))
        except Exception as exc:
            return exc


def checked(name: str, out: Any, n: int) -> list[float]:
    """A function's rewards as finite floats, one per completion; anything else is poison
    (what a function returns for an event is that event's outcome, never a zero)."""
    if not isinstance(out, list | tuple) or len(out) != n:
        raise PoisonEventError(f"reward function {name!r} returned {type(out).__name__} "
                               f"instead of {n} rewards")
    try:
        rewards = [float(r) for r in out]
    except (TypeError, ValueError) as exc:
        raise PoisonEventError(f"reward function {name!r} returned a non-number: {exc}") from exc
    if not all(math.isfinite(r) for r in rewards):
        raise PoisonEventError(f"reward function {name!r} returned a non-finite reward")
    return rewards


def _declared_int(fn: Any, attr: str, where: str) -> int:
    value = getattr(fn, attr, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RewardConfigError(f"reward {where} must declare an integer `{attr}` >= 0 "
                                f"(workers.rewards.registry.declare(version=...) or "
                                f"fn.{attr} = 1), got {value!r}")
    return value


def function_reward(name: str, target: str, fn: Any) -> FunctionReward:
    """Check a loaded entry point or `module:function` and wrap it."""
    where = f"{name!r} ({target})"
    if not callable(fn):
        raise RewardConfigError(f"reward {where} is not callable")
    return FunctionReward(name, _declared_int(fn, "version", where), target, fn,
                          batched=bool(getattr(fn, "batched", False)),
                          inline=bool(getattr(fn, "inline", False))
                          or target.startswith("workers.rewards."))


def load_target(target: str) -> Any:
    """`package.module:attribute` -> the object (an entry point's value, or a setting's)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise RewardConfigError(f"reward target {target!r} is not 'module:function'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RewardConfigError(f"cannot load reward {target!r}: {exc}") from exc
    return obj


class Rewards:
    """The process's reward table: name -> `Reward`."""

    def __init__(self, rewards: Mapping[str, Reward]) -> None:
        self._rewards = dict(rewards)

    @classmethod
    def load(cls, settings: Settings, *, installed: Iterable[EntryPoint] | None = None
             ) -> Rewards:
        """Built-ins, installed plugins, settings' plugins and endpoints; raises
        `RewardConfigError` for anything that does not load or collides."""
        from workers.rewards.http import HttpReward

        points = [EntryPoint(n, v, GROUP) for n, v in BUILTINS.items()]
        points += list(entry_points(group=GROUP) if installed is None else installed)
        points += [EntryPoint(n, v, GROUP) for n, v in settings.reward_plugins.items()]
        targets: dict[str, str] = {}
        rewards: dict[str, Reward] = {}
        for point in points:
            seen = targets.setdefault(point.name, point.value)
            if seen != point.value:
                raise RewardConfigError(f"reward {point.name!r} is defined twice: {seen} and "
                                        f"{point.value}")
            if point.name not in rewards:
                rewards[point.name] = function_reward(point.name, point.value,
                                                      load_target(point.value))
        for name, endpoint in settings.reward_endpoints.items():
            if name in rewards:
                raise RewardConfigError(f"reward {name!r} is both {targets[name]} and the "
                                        f"endpoint {endpoint.url}")
            rewards[name] = HttpReward(name, endpoint)
        return cls(rewards)

    @classmethod
    def builtins(cls) -> Rewards:
        """Only the built-ins (a context made by hand in a test)."""
        return cls({n: function_reward(n, v, load_target(v)) for n, v in BUILTINS.items()})

    def names(self) -> list[str]:
        return sorted(self._rewards)

    def __contains__(self, name: object) -> bool:
        return name in self._rewards

    def get(self, name: str) -> Reward:
        reward = self._rewards.get(name)
        if reward is None:
            raise PoisonEventError(f"unknown reward function {name!r}; known: "
                                   f"{', '.join(self.names())}")
        return reward

    async def score_many(self, groups: Sequence[tuple[str, InteractionLogged, Sequence[str]]]
                         ) -> list[list[float] | Exception]:
        """Score groups (reward name, interaction, texts) concurrently: each reward gets its
        groups in one call (an HTTP judge batches and parallelises them); returns, per group,
        its rewards or the exception it failed with."""
        out: list[list[float] | Exception] = [RetryableError("not scored")] * len(groups)
        by_name: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(groups):
            if name in self._rewards:
                by_name.setdefault(name, []).append(i)
            else:
                out[i] = self._unknown(name)

        async def run(name: str, idx: list[int]) -> None:
            started = time.perf_counter()
            reward = self._rewards[name]
            results = await reward.score_many([groups[i][1:] for i in idx])
            if not getattr(reward, "times_groups", False):  # else it observed its calls
                SCORE_SECONDS.labels(reward=name).observe(time.perf_counter() - started)
            for i, result in zip(idx, results, strict=True):
                out[i] = result

        await asyncio.gather(*(run(name, idx) for name, idx in by_name.items()))
        return out

    def score_many_sync(self, groups: Sequence[tuple[str, InteractionLogged, Sequence[str]]]
                        ) -> list[list[float] | Exception]:
        """`score_many` from synchronous code (the model thread); from a thread whose event
        loop is running, on a helper thread of its own (never blocking that loop's work with
        a nested loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.score_many(groups))
        with ThreadPoolExecutor(1, thread_name_prefix="lorastream-reward") as pool:
            return pool.submit(asyncio.run, self.score_many(groups)).result()

    def score_sync(self, name: str, interaction: InteractionLogged,
                   texts: Sequence[str]) -> list[float]:
        """One group's rewards, raising what it failed with."""
        (result,) = self.score_many_sync([(name, interaction, texts)])
        if isinstance(result, Exception):
            raise result
        return result

    def _unknown(self, name: str) -> PoisonEventError:
        return PoisonEventError(f"unknown reward function {name!r}; known: "
                                f"{', '.join(self.names())}")

