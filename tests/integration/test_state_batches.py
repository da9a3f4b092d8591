"""The stage's one-command batch writes and reads on real Redis (`workers.pipeline.state`).

The held-out store and the pause check run once per ingest batch as single Lua commands; these
pin what they must keep meaning: every prompt of every policy lands (also past the script's
chunk of 400 arguments), a rewrite is idempotent, and each policy gets its own pause reason.
"""

from __future__ import annotations

from infra.settings import Settings
from schemas.events import InteractionLogged
from workers.pipeline.state import PolicyState


def _prompt(policy: str, i: int) -> InteractionLogged:
    return InteractionLogged(event_id=f"{policy}-{i}", policy_id=policy, prompt=f"q {i}?",
                             task="length", split="eval")


def test_heldout_batch_spans_policies_and_chunks(settings: Settings) -> None:
    state = PolicyState(settings)
    batch = [_prompt("big", i) for i in range(450)] + [_prompt("small", i) for i in range(3)]
    state.add_heldout_many(batch)
    state.add_heldout_many(batch[:10])  # redelivered: the same fields again
    big, small = state.heldout("big"), state.heldout("small")
    assert sorted(h.event_id for h in big) == sorted(f"big-{i}" for i in range(450))
    assert [h.prompt for h in small] == ["q 0?", "q 1?", "q 2?"]
    assert big[0] == next(b for b in batch if b.event_id == big[0].event_id)


def test_paused_reasons_per_policy(settings: Settings) -> None:
    state = PolicyState(settings)
    state.r.hset(state.keys.paused("b"), mapping={"reason": "nan loss", "stage": "update"})
    assert state.paused_reasons(["a", "b", "c"]) == [None, b"nan loss", None]
    assert state.paused_reasons([]) == []
