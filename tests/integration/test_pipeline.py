"""End to end on the real broker and Redis: a worker process runs every stage.

Interaction logs go in through the producer SDK; evaluation events must come out; the promoted
revision's files must load with `PeftModel.from_pretrained` and change the base model's logits;
a malformed event must land in the dead-letter topic without stopping the stream.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import orjson
import pytest
import torch
from kafka import KafkaProducer
from peft import PeftModel

from infra.admin import consumer_lag
from infra.settings import Settings
from schemas import InteractionLogged
from streams.app import group_id
from streams.sdk.follow import PipelineFollower
from streams.sdk.producer import InteractionProducer
from streams.sdk.watch import tail
from tests.support.processes import start_worker, stop_process
from tests.support.waiting import wait_for
from workers.models.base import load_base_model

pytestmark = pytest.mark.run_settings(
    export_every=2, group_size=4, max_new_tokens=6,
    promote_margin=-1.0,  # promote every new revision: this test is about the plumbing
    update_batch=1,  # one group per step, so the revisions to expect are known
)

STEPS = 4


@pytest.fixture
def worker(run: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path / "worker.log"
    proc = start_worker(run, "all", log)
    yield proc
    stop_process(proc, log)


def _interactions(policy: str) -> list[InteractionLogged]:
    def length(prompt: str, split: Literal["train", "eval"] = "train") -> InteractionLogged:
        return InteractionLogged(policy_id=policy, prompt=prompt, split=split, task="length",
                                 task_params={"target_chars": 0})

    held = [length(f"held {i}?", split="eval") for i in range(2)]
    return held + [length(f"train {i}?") for i in range(STEPS)]


def test_interactions_flow_to_evaluations_and_a_servable_revision(
    run: Settings, worker: subprocess.Popen[bytes], tiny_model_dir: Path
) -> None:
    policies = ["alice", "bob"]
    with InteractionProducer(run) as producer:
        for p in policies:
            for ev in _interactions(p):
                producer.send(ev)
    # A malformed event from some other producer, between good ones.
    raw = KafkaProducer(bootstrap_servers=run.bootstrap_servers)
    raw.send(run.topic("interactions"), key=b"alice", value=b'{"policy_id": "alice", "pro')
    raw.flush()
    raw.close()

    follower = PipelineFollower(run, policies, interactions=STEPS)
    assert follower.follow(240, on_progress=print, alive=lambda: worker.poll() is None)

    evaluations = list(tail(run, "evaluations", from_beginning=True, timeout_s=3))
    assert {(e["policy_id"], e["revision"]) for e in evaluations} == {
        (p, r) for p in policies for r in (1, 2)
    }
    promotions = follower.progress["alice"].promoted
    assert set(promotions) == {1, 2}
    serving = next(e for e in evaluations if e["policy_id"] == "alice" and e["revision"] == 2)

    base, tok = load_base_model(tiny_model_dir)
    ids = tok("how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, serving["path"])(ids).logits
    assert not torch.allclose(before, after, atol=1e-6)

    letters = list(tail(run, "dead-letters", from_beginning=True, timeout_s=3))
    assert len(letters) == 1 and letters[0]["stage"] == "rollout"
    assert base64.b64decode(letters[0]["original_b64"]) == b'{"policy_id": "alice", "pro'
    assert "malformed JSON" in letters[0]["error"]

    group = group_id(run, ["rollout", "reward", "update", "export", "evaluate", "promote"])

    def drained() -> bool:
        rows = [r for r in consumer_lag(run, group) if r.topic == run.topic("interactions")]
        return bool(rows) and sum(r.lag for r in rows) == 0

    wait_for(drained, timeout=30, message="committed offsets to reach the end of interactions")
    assert orjson.loads(orjson.dumps(follower.summary(1.0)))["policies"][0]["revisions"] == 2
