"""Schema round trips, tolerant reading, and the reasons given for bad input."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel

from schemas import (
    EVENT_TYPES,
    AdapterEvaluated,
    Completion,
    DeadLetter,
    InteractionLogged,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
    decode_event,
    encode_event,
)
from schemas.errors import PoisonEventError
from schemas.events import json_schemas

SHA = "ab" * 32


def _interaction(**kw: object) -> InteractionLogged:
    data: dict[str, object] = {"policy_id": "alice", "prompt": "hi?", "task": "reference",
                               "reference": "yes"}
    data.update(kw)
    return InteractionLogged.model_validate(data)


def _samples() -> list[BaseModel]:
    inter = _interaction()
    ro = RolloutGenerated(
        policy_id="alice", interaction=inter, revision=0, prompt_ids=[1, 2],
        completions=[Completion(text="ye", token_ids=[3, 4], logprobs=[-0.5, -1.0])],
        temperature=1.0,
    )
    return [
        inter,
        ro,
        RolloutRewarded(policy_id="alice", rollout=ro, rewards=[0.5], reward_fn="reference"),
        PolicyUpdated(policy_id="alice", step=3, loss=0.1, mean_reward=0.4, tokens=12),
        AdapterEvaluated(policy_id="alice", revision=1, sha256=SHA, path="/x", score=0.6,
                         baseline_revision=0, baseline_score=0.5, prompts=4, passed=True),
        DeadLetter(stage="reward", error_type="X", error="why", original_b64=""),
    ]


@pytest.mark.parametrize("event", _samples(), ids=lambda e: type(e).__name__)
def test_round_trip(event: BaseModel) -> None:
    raw = encode_event(event)
    again = decode_event(type(event), raw)
    assert again == event
    assert orjson.loads(raw)["schema_version"] == 1


def test_every_event_has_the_common_fields() -> None:
    for name, model in EVENT_TYPES.items():
        fields = set(model.model_fields)
        assert {"event_id", "schema_version", "policy_id", "ts"} <= fields, name


def test_unknown_fields_are_tolerated() -> None:
    data = orjson.loads(encode_event(_interaction()))
    data["added_by_a_newer_producer"] = {"nested": [1, 2]}
    event = decode_event(InteractionLogged, orjson.dumps(data))
    assert event.prompt == "hi?"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "empty value"),
        (b'{"policy_id": "a"}', "prompt: Field required"),
        (b'{"policy_id": "../etc", "prompt": "x"}', "policy_id"),
        (b'{"policy_id": "a", "prompt": ""}', "prompt"),
        (b'{"policy_id": "a", "prompt": "x", "feedback": 3}', "feedback"),
    ],
)
def test_bad_input_has_a_clear_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonEventError, match=reason):
        decode_event(InteractionLogged, raw)


def test_oversized_prompt_is_rejected() -> None:
    raw = orjson.dumps({"policy_id": "a", "prompt": "x" * 9000})
    with pytest.raises(PoisonEventError, match="prompt"):
        decode_event(InteractionLogged, raw)


def test_non_finite_numbers_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        PolicyUpdated(policy_id="a", step=1, loss=math.nan, mean_reward=0.0, tokens=1)
    inter = _interaction()
    ro = RolloutGenerated(policy_id="a", interaction=inter, revision=0, prompt_ids=[1],
                          completions=[Completion(text="", token_ids=[], logprobs=[])],
                          temperature=1.0)
    with pytest.raises(ValueError, match="finite"):
        RolloutRewarded(policy_id="a", rollout=ro, rewards=[math.inf], reward_fn="x")


def test_json_schemas_cover_every_event() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    assert "prompt" in schemas["interaction_logged"]["properties"]
    assert "policy_id" in schemas["interaction_logged"]["required"]


def test_committed_json_schemas_are_current(tmp_path: Path) -> None:
    """Producers in other languages validate against schemas/json: it must not drift."""
    from streams.cli.main import main

    assert main(["schemas", "--out", str(tmp_path)]) == 0
    committed = Path(__file__).resolve().parents[2] / "schemas" / "json"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in committed.iterdir())
    for name in generated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
