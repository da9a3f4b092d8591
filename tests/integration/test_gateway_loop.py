"""The loop closed, on the real broker and Redis: a user chats with a policy through the
official `openai` client, rates the answers, the pipeline trains on that feedback and promotes a
revision, and the next request is answered by the promoted revision."""

from __future__ import annotations

from pathlib import Path

import openai

from infra.settings import Settings
from schemas.catalog import LoraConfig
from schemas.events import InteractionLogged
from schemas.ids import derive_id
from streams.sdk.producer import InteractionProducer
from tests.support.gateway import ServingStack, engine
from tests.support.processes import start_worker, stop_process
from tests.support.waiting import wait_for
from workers.catalog.provenance import cached_base_hash
from workers.catalog.read import revisions_of
from workers.catalog.writer import Catalog
from workers.models.base import LoraSpec
from workers.serving.gateway.apikeys import ApiKeys


def test_feedback_through_the_gateway_trains_and_the_promoted_revision_answers(
        settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    run = settings.model_copy(update={
        "base_model": tiny_model_dir, "export_every": 2, "group_size": 4, "max_new_tokens": 6,
        "promote_margin": -1.0,  # promote every evaluated revision: this is about the loop
        "update_batch": 1})
    # The user's policy exists (serving the base model for now), with its held-out prompts.
    catalog = Catalog(run)
    spec = LoraSpec(rank=run.lora_rank, alpha=run.lora_alpha)
    catalog.register("alice", base_model=str(tiny_model_dir),
                     base_model_hash=cached_base_hash(str(tiny_model_dir)),
                     lora=LoraConfig(rank=spec.rank, alpha=spec.alpha,
                                     target_modules=spec.target_modules))
    with InteractionProducer(run) as producer:
        for i in range(2):
            producer.send(InteractionLogged(policy_id="alice", prompt=f"held {i}?",
                                            split="eval", task="length",
                                            task_params={"target_chars": 0}))
    secret, _ = ApiKeys(run).create("default")
    log = tmp_path / "worker.log"
    worker = start_worker(run, "all", log)
    server = engine(tiny_model_dir)
    try:
        with ServingStack(run, [server]) as stack:
            oa = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=secret, max_retries=0)
            rated: set[str] = set()
            for i in range(2):
                answer = oa.chat.completions.create(
                    model="alice", messages=[{"role": "user", "content": f"say hi {i}"}],
                    max_tokens=6)
                assert answer.model == "alice@0"  # the base model, explicitly
                receipt = oa.post("/feedback", cast_to=dict,
                                  body={"id": answer.id, "score": 1.0})
                rated.add(derive_id("rollout", receipt["event_id"]))
            serving = wait_for(lambda: catalog.index.serving("alice").revision, 240,
                               interval=0.5, message="a revision trained on the feedback")
            after = oa.chat.completions.create(
                model="alice", messages=[{"role": "user", "content": "say hi"}], max_tokens=6)
            assert after.model == f"alice@{serving}"
        # It was trained on what the user said: the promoted revision's provenance names the
        # rollouts of the rated answers (the only training interactions there are).
        entry = catalog.index.get("alice")
        assert entry is not None
        (promoted,) = [r for r in revisions_of(run, entry) if r["revision"] == serving]
        trained = set(promoted["provenance"]["rollout_ids"])
        assert trained and trained <= rated
    finally:
        server.stop()
        stop_process(worker, log)
        catalog.close()
