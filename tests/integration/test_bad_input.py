"""Bad input on the real broker: every kind lands in `dead-letters` with the stage, the reason
and the original bytes, while good events (with unknown extra fields) keep flowing through a
real worker process (rollout, reward and update stages).

"Unknown policy" is a syntactically valid policy id that the catalog has no registration for;
it is refused only when `require_registered_policies` is on (the default lets the first export
register a policy, so a new user needs no set-up).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from infra.settings import Settings
from schemas.catalog import LoraConfig
from schemas.events import MAX_PROMPT_CHARS
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import start_worker, stop_process
from tests.support.waiting import wait_for
from workers.catalog.writer import Catalog

pytestmark = pytest.mark.run_settings(group_size=2, max_new_tokens=4, update_batch=1,
                                      export_every=1000, require_registered_policies=True)

GOOD = {"policy_id": "alice", "prompt": "hi?", "task": "length",
        "task_params": {"target_chars": 0}}
BAD_INTERACTIONS: list[tuple[str, bytes, str]] = [
    ("malformed", b'{"policy_id": "alice", "pro', "malformed JSON"),
    ("schema", orjson.dumps({**GOOD, "prompt": ""}), "schema violation: prompt"),
    ("no policy", orjson.dumps({k: v for k, v in GOOD.items() if k != "policy_id"}),
     "schema violation: policy_id: Field required"),
    ("bad policy id", orjson.dumps({**GOOD, "policy_id": "../etc"}), "schema violation"),
    ("unknown policy", orjson.dumps({**GOOD, "policy_id": "mallory"}),
     "unknown policy 'mallory'"),
    ("oversized", orjson.dumps({**GOOD, "prompt": "x" * (MAX_PROMPT_CHARS + 1)}),
     "schema violation: prompt: String should have at most"),
    ("invalid utf-8", b'{"policy_id": "alice", "prompt": "\xff\xfe?"}', "malformed JSON"),
    ("not an object", b"[1, 2]", "expected a JSON object"),
]
BAD_REWARDS = [b"[NaN, 0.5]", b"[Infinity, 0.0]", b"[-Infinity, 1.0]", b"[1e999, 0.0]"]


@pytest.fixture
def worker(run: Settings, tmp_path: Path) -> Iterator[None]:
    catalog = Catalog(run)
    catalog.register("alice", base_model="tiny", base_model_hash="0" * 64,
                     lora=LoraConfig(rank=run.lora_rank, alpha=run.lora_alpha))
    catalog.close()
    log = tmp_path / "worker.log"
    proc = start_worker(run, "rollout,reward,update", log)
    yield
    stop_process(proc, log)


def _updates(run: Settings) -> list[dict[str, Any]]:
    return [u for u in read_topic(run, "updates", 0.5) if u.get("kind") == "policy_updated"]


def _nan_rewards(good: dict[str, Any]) -> list[bytes]:
    out = []
    for i, tokens in enumerate(BAD_REWARDS):
        body = orjson.dumps({**good, "event_id": f"bad-reward-{i}", "rewards": "__R__"})
        out.append(body.replace(b'"__R__"', tokens))
    return out


def test_every_bad_kind_is_dead_lettered_and_good_events_flow(run: Settings,
                                                             worker: None) -> None:
    extra = {**GOOD, "event_id": "good-1", "added_in_v2": {"nested": [1, 2]}, "colour": "red"}
    produce_raw(run, "interactions", [(b"alice", raw) for _, raw, _ in BAD_INTERACTIONS]
                + [(b"alice", orjson.dumps(extra))])
    rewards = wait_for(lambda: read_topic(run, "rewards", 0.5), 180, interval=0.5,
                       message="the good interaction's rewards")
    assert rewards[0]["rollout"]["interaction"]["event_id"] == "good-1"
    bad_rewards = _nan_rewards(rewards[0])
    produce_raw(run, "rewards", [(b"alice", raw) for raw in bad_rewards])
    produce_raw(run, "interactions", [(b"alice", orjson.dumps({**GOOD, "event_id": "good-2"}))])

    updates = wait_for(lambda: len(u := _updates(run)) >= 2 and u, 180, interval=0.5,
                       message="both good interactions trained on")
    assert [u["step"] for u in updates] == [1, 2]
    expected = len(BAD_INTERACTIONS) + len(BAD_REWARDS)
    letters = wait_for(lambda: len(d := read_topic(run, "dead-letters")) >= expected and d, 60,
                       message="every bad event dead-lettered")
    assert len(letters) == expected
    by_bytes = {base64.b64decode(d["original_b64"]): d for d in letters}
    for name, raw, reason in BAD_INTERACTIONS:
        letter = by_bytes[raw]
        assert letter["stage"] == "rollout", name
        assert reason in letter["error"], (name, letter["error"])
        assert letter["topic"] == run.topic("interactions") and letter["offset"] is not None
    for raw in bad_rewards:
        letter = by_bytes[raw]
        assert letter["stage"] == "update" and "malformed JSON" in letter["error"]
