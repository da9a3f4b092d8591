"""Stage agents under Faust's test context: decode, call the stage, send; dead-letter the rest.

Outputs go to in-memory Faust channels instead of Kafka topics; the agent itself, the stream,
the dedup marks (real Redis) and the stage function are the production ones.
"""

from __future__ import annotations

import base64

import orjson
import pytest
from faust.types import AgentT, ChannelT

from infra.settings import Settings
from schemas import DeadLetter, InteractionLogged, RolloutGenerated, RolloutRewarded, decode_event
from schemas.codec import encode_event
from schemas.events import Completion
from schemas.ids import record_id
from tests.support.stages import in_process_stage

AgentUnderTest = tuple[AgentT, ChannelT, ChannelT]
"""(agent, subscription to its sink, subscription to its dead letters)."""


def _rollout(policy: str = "alice", task: str = "length") -> RolloutGenerated:
    inter = InteractionLogged(policy_id=policy, prompt="hi?", task=task,
                              task_params={"target_chars": 0})
    return RolloutGenerated(
        policy_id=policy, interaction=inter, revision=0, prompt_ids=[1, 2],
        completions=[Completion(text=t, token_ids=[5] * len(t), logprobs=[-1.0] * len(t))
                     for t in ("", "abc", "abcdefgh")],
        temperature=1.0,
    )


async def _drain(subscriber: ChannelT, count: int) -> list[bytes]:
    """The next `count` values sent to a channel (through a subscription made beforehand)."""
    out = []
    for _ in range(count):
        event = await subscriber.get(timeout=10)
        out.append(event.value)
    return out


@pytest.fixture
def reward_agent(settings: Settings) -> AgentUnderTest:
    agent, runner = in_process_stage(settings, "reward")
    # Subscribe before anything is sent: a Faust channel delivers only to its subscribers.
    return agent, runner.sink.__aiter__(), runner.dead_letters.__aiter__()


async def test_good_event_is_scored_and_sent(reward_agent: AgentUnderTest) -> None:
    agent, sink, _ = reward_agent
    ro = _rollout()
    async with agent.test_context() as ctx:
        await ctx.put(encode_event(ro), key=b"alice")
        (raw,) = await _drain(sink, 1)
    out = decode_event(RolloutRewarded, raw)
    assert out.rollout.event_id == ro.event_id
    assert out.rewards[0] > out.rewards[1] > out.rewards[2]  # shorter is better for target 0
    assert out.reward_fn == "length"


async def test_bad_events_are_dead_lettered_and_the_stream_goes_on(
    reward_agent: AgentUnderTest,
) -> None:
    agent, sink, dlq = reward_agent
    unknown_task = _rollout(task="no-such-reward")
    bad = [b"{not json", b'{"policy_id": "alice"}', encode_event(unknown_task)]
    good = _rollout()
    async with agent.test_context() as ctx:
        for raw in bad:
            await ctx.put(raw, key=b"alice")
        await ctx.put(encode_event(good), key=b"alice")
        letters = [decode_event(DeadLetter, x) for x in await _drain(dlq, 3)]
        (raw,) = await _drain(sink, 1)
    assert decode_event(RolloutRewarded, raw).rollout.event_id == good.event_id
    assert [base64.b64decode(d.original_b64) for d in letters] == bad
    assert all(d.stage == "reward" for d in letters)
    assert "malformed JSON" in letters[0].error
    assert "schema violation" in letters[1].error
    assert "unknown reward function 'no-such-reward'" in letters[2].error
    assert letters[2].policy_id == "alice"


async def test_redelivered_event_is_processed_once(reward_agent: AgentUnderTest) -> None:
    agent, sink, _ = reward_agent
    ro = _rollout()
    other = _rollout()
    async with agent.test_context() as ctx:
        await ctx.put(encode_event(ro), key=b"alice")
        await ctx.put(encode_event(ro), key=b"alice")  # at-least-once: the same event again
        await ctx.put(encode_event(other), key=b"alice")
        outs = [orjson.loads(x) for x in await _drain(sink, 2)]
    assert [o["rollout"]["event_id"] for o in outs] == [ro.event_id, other.event_id]
    assert sink.empty()


async def test_held_out_batch_is_stored_in_bulk_idempotently(settings: Settings) -> None:
    """The rollout stage's bulk path (the ingest hot path): a batch of held-out prompts is
    stored with one seen-check for the batch and no seen-marks (the store is keyed by event id),
    yet still dead-letters what it must (bad bytes, an unknown reward function, a paused
    policy), drops in-batch copies and what was handled before, and a redelivered batch
    changes nothing."""
    from streams.runner.runner import Received
    from workers.pipeline import guards

    agent, runner = in_process_stage(settings, "rollout")
    dlq = runner.dead_letters.__aiter__()
    guards.pause(runner.ctx, "frozen", "update", "test")

    def held(policy: str, i: int, task: str = "length") -> InteractionLogged:
        return InteractionLogged(policy_id=policy, prompt=f"q{i}?", task=task, split="eval")

    good = [held("alice", i) for i in range(3)] + [held("bob", 9)]
    refused = [held("alice", 7, task="no-such-reward"), held("frozen", 8)]
    # handled before its policy was paused: a copy to drop, not a refusal to dead-letter
    handled = InteractionLogged(policy_id="frozen", prompt="trained?", task="length")
    runner.ctx.state.mark_seen_many("rollout", [handled.event_id])
    raws = [encode_event(e) for e in good] + [encode_event(good[0]), b"{nope"] + [
        encode_event(e) for e in [*refused, handled]]
    # no event_id on the wire: the id derives from the record's coordinates, and the record,
    # stored as it came, reads back under that id
    raws.append(b'{"policy_id":"bob","prompt":"anonymous?","task":"length","split":"eval"}')
    batch = [Received(raw, "interactions", 0, i) for i, raw in enumerate(raws)]
    async with agent.test_context():
        assert await runner.process_many(batch) == []
        letters = [decode_event(DeadLetter, (await dlq.get(timeout=10)).value) for _ in range(3)]
        assert await runner.process_many(batch) == []  # redelivered: stored again, or bad again
        again = [decode_event(DeadLetter, (await dlq.get(timeout=10)).value) for _ in range(3)]
        assert dlq.empty()  # nothing for the copy handled before the pause
    state = runner.ctx.state
    assert sorted(h.event_id for h in state.heldout("alice")) == sorted(
        e.event_id for e in good[:3])
    assert sorted(h.event_id for h in state.heldout("bob")) == sorted(
        [good[3].event_id, record_id("interactions", 0, len(raws) - 1)])
    assert "anonymous?" in [h.prompt for h in state.heldout("bob")]
    assert state.heldout("frozen") == []
    assert sorted(d.offset or 0 for d in letters) == [5, 6, 7]
    assert "unknown reward function" in next(d.error for d in letters if d.offset == 6)
    assert "policy paused" in next(d.error for d in letters if d.offset == 7)
    assert sorted(d.offset or 0 for d in again) == [5, 6, 7]  # refused events are never marked
    assert not any(state.seen_many("rollout", [e.event_id for e in good + refused]))
