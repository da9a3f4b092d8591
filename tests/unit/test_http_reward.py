"""The HTTP judge against a real scoring server on loopback (`workers.reference.judge`):
batched calls, retries with backoff, timeouts, the circuit breaker, refusals and bad answers
(never a zero reward), and an event loop that keeps running while calls are in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from infra.settings import RewardEndpoint
from schemas.errors import PoisonEventError, RetryableError
from schemas.events import InteractionLogged
from workers.reference.judge import Judge
from workers.rewards.functions import length_reward
from workers.rewards.http import CircuitBreaker, HttpReward

IT = InteractionLogged(policy_id="p", prompt="q?", task="length")


def _groups(n: int) -> list[tuple[InteractionLogged, list[str]]]:
    return [(IT, ["a" * (i % 5), "bb", ""]) for i in range(n)]


@pytest.fixture
async def judge() -> AsyncIterator[Judge]:
    j = Judge()
    await j.start()
    yield j
    await j.stop()


def _reward(judge: Judge, **kw: object) -> HttpReward:
    opts: dict[str, object] = {"backoff_s": 0.01, "timeout_s": 2.0, **kw}
    return HttpReward("judge", RewardEndpoint(url=judge.url, **opts))  # type: ignore[arg-type]


async def test_groups_are_batched_into_concurrent_calls(judge: Judge) -> None:
    judge.delay_s = 0.2
    reward = _reward(judge, max_groups_per_call=8, max_concurrency=16)
    groups = _groups(70)
    started = time.monotonic()
    got = await reward.score_many(groups)
    elapsed = time.monotonic() - started
    await reward.close()
    assert got == [[length_reward(i, t) for t in texts] for i, texts in groups]
    assert (judge.calls, judge.groups) == (9, 70)  # ceil(70 / 8) calls, every group once
    assert elapsed < 2 * 0.2 + 0.5  # all nine in flight at once, not 9 x 0.2 s


async def test_transient_failures_are_retried_with_backoff(judge: Judge) -> None:
    judge.fail_first = 2
    reward = _reward(judge, retries=3)
    got = await reward.score_many(_groups(3))
    await reward.close()
    assert all(isinstance(g, list) for g in got) and judge.calls == 3
    assert reward.breaker.state == "closed"


async def test_after_retries_failures_are_retryable_never_zero(judge: Judge) -> None:
    judge.delay_s = 0.5
    reward = _reward(judge, retries=1, timeout_s=0.1, breaker_failures=10)
    got = await reward.score_many(_groups(5))
    await reward.close()
    assert all(isinstance(g, RetryableError) for g in got)
    assert "after 2 attempt(s)" in str(got[0]) and "TimeoutError" in str(got[0])
    assert judge.calls == 2


async def test_the_circuit_opens_fails_fast_and_closes_after_a_good_trial(judge: Judge) -> None:
    judge.status = 503
    reward = _reward(judge, retries=1, breaker_failures=2, breaker_reset_s=0.3,
                     max_groups_per_call=1, max_concurrency=1)
    first = await reward.score_many(_groups(1))
    assert isinstance(first[0], RetryableError) and reward.breaker.state == "open"
    calls = judge.calls
    fast = time.monotonic()
    shut = await reward.score_many(_groups(3))
    assert time.monotonic() - fast < 0.1 and judge.calls == calls  # no call while open
    assert all(isinstance(g, RetryableError) and "circuit open" in str(g) for g in shut)
    opened = time.monotonic()
    reward.breaker.clock = lambda: opened + 0.35  # past reset_s, without sleeping through it
    judge.status = 200
    assert reward.breaker.state == "half-open"
    trial = await reward.score_many(_groups(1))  # the one trial call: it closes the circuit
    assert isinstance(trial[0], list) and reward.breaker.state == "closed"
    again = await reward.score_many(_groups(3))
    await reward.close()
    assert all(isinstance(g, list) for g in again)


async def test_refusals_are_poison_and_bad_answers_retryable(judge: Judge) -> None:
    judge.status = 422
    reward = _reward(judge, retries=0)
    (refused,) = await reward.score_many(_groups(1))
    assert isinstance(refused, PoisonEventError) and "422" in str(refused)
    judge.status = 200
    mangled = HttpReward("judge", RewardEndpoint(url=judge.url.replace("/score", "/nope"),
                                                 retries=0))
    (missing,) = await mangled.score_many(_groups(1))
    await reward.close()
    await mangled.close()
    assert isinstance(missing, RetryableError) and "HTTP 404" in str(missing)
    assert reward._group_scores([1.0, "x"], 2).__class__ is RetryableError
    assert isinstance(reward._group_scores([1.0, float("inf")], 2), RetryableError)
    assert reward._group_scores([1, 0.5], 2) == [1.0, 0.5]


async def test_the_event_loop_keeps_running_while_the_judge_thinks(judge: Judge) -> None:
    judge.delay_s = 0.3
    reward = _reward(judge)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await reward.score_many(_groups(40))
    ticker.cancel()
    await reward.close()
    assert ticks >= 15  # ~30 possible in 0.3 s: the loop was never held


def test_breaker_states_with_a_clock() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, reset_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failure()  # the trial failed: open again
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
