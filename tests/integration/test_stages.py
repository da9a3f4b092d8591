"""The stage functions chained by hand over real Redis and a real tiny model (no Kafka).

This is the pipeline's logic without the transport: it shows each stage's output feeds the next,
that revisions are numbered once per trainer step, and that promotion moves the serving alias.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from infra.settings import Settings
from schemas import (
    AdapterEvaluated,
    AdapterExported,
    InteractionLogged,
    PolicyPromoted,
    PolicyUpdated,
    RolloutGenerated,
    RolloutRewarded,
)
from schemas.errors import PoisonEventError
from tests.support.stages import only
from workers.models.base import load_base_model
from workers.pipeline.context import StageContext
from workers.pipeline.evaluate import evaluate
from workers.pipeline.export import export
from workers.pipeline.promote import promote
from workers.pipeline.reward import reward
from workers.pipeline.rollout import rollout
from workers.pipeline.update import update

pytestmark = pytest.mark.run_settings(export_every=2, group_size=4, max_new_tokens=6)


@pytest.fixture
def ctx(run: Settings) -> StageContext:
    return StageContext.create(run)


def _train(policy: str, i: int) -> InteractionLogged:
    return InteractionLogged(policy_id=policy, prompt=f"q {i}?", task="length",
                             task_params={"target_chars": 0})


def _through_update(ctx: StageContext, interaction: InteractionLogged) -> PolicyUpdated:
    ro = only(RolloutGenerated, rollout(ctx, interaction))
    rw = only(RolloutRewarded, reward(ctx, ro))
    return only(PolicyUpdated, update(ctx, [rw]))


def test_heldout_prompts_are_stored_not_sampled(ctx: StageContext) -> None:
    ev = InteractionLogged(policy_id="p", prompt="held out?", task="length", split="eval")
    assert rollout(ctx, ev) == []
    assert rollout(ctx, ev) == []  # redelivery: still one held-out prompt
    assert [h.event_id for h in ctx.state.heldout("p")] == [ev.event_id]


def test_unknown_task_is_poison_before_any_sampling(ctx: StageContext) -> None:
    ev = InteractionLogged(policy_id="p", prompt="x?", task="nope")
    with pytest.raises(PoisonEventError, match="unknown reward function 'nope'"):
        rollout(ctx, ev)


def test_rollout_is_reproducible_for_a_redelivered_interaction(ctx: StageContext) -> None:
    ev = _train("p", 0)
    a = only(RolloutGenerated, rollout(ctx, ev))
    b = only(RolloutGenerated, rollout(ctx, ev))
    assert a.event_id == b.event_id
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len(a.completions) == 4 and a.revision == 0


def test_chain_exports_evaluates_and_promotes(ctx: StageContext, tiny_model_dir: Path) -> None:
    rollout(ctx, InteractionLogged(policy_id="p", prompt="held?", task="length",
                                          task_params={"target_chars": 0}, split="eval"))
    first = _through_update(ctx, _train("p", 0))
    assert first.step == 1 and first.checkpoint is None
    assert export(ctx, first) == []
    second = _through_update(ctx, _train("p", 1))
    assert second.step == 2 and second.checkpoint is not None

    (exp,) = export(ctx, second)
    assert isinstance(exp, AdapterExported) and exp.revision == 1
    # A redelivered update: the same revision, the same artifact.
    again = only(AdapterExported, export(ctx, second))
    assert (again.revision, again.sha256, again.event_id) == (1, exp.sha256, exp.event_id)
    assert ctx.index.head("p").revision == 1
    files = sorted(p.name for p in Path(exp.path).iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]

    (ev,) = evaluate(ctx, exp)
    assert isinstance(ev, AdapterEvaluated)
    assert ev.baseline_revision == 0 and ev.prompts == 1
    # A passed verdict, consistent with its scores (the promote stage checks them again).
    forced = ev.model_copy(update={"passed": True, "score": ev.baseline_score + 1.0})
    promo = only(PolicyPromoted, promote(ctx, forced))
    assert promo.serve_name == "p@1"
    assert ctx.index.serving("p").revision == 1
    assert ctx.index.hot_set() == ["p@1"]
    assert promote(ctx, forced) == []  # idempotent
    assert promote(ctx, ev.model_copy(update={"passed": False})) == []

    base, tok = load_base_model(tiny_model_dir)
    ids = tok("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, exp.path)(ids).logits
    assert not torch.allclose(before, after)


def test_export_refuses_a_checkpoint_outside_the_store(ctx: StageContext) -> None:
    up = PolicyUpdated(policy_id="p", step=2, loss=0.0, mean_reward=0.0, tokens=1,
                       checkpoint="/etc/passwd")
    with pytest.raises(PoisonEventError, match="outside the artifact store"):
        export(ctx, up)


def test_embedded_engine_runs_on_the_configured_threads(ctx: StageContext) -> None:
    """The worker's loopback engine takes `engine_threads` (1 by default: it shares the
    process with the trainer's OpenMP team)."""
    assert ctx.settings.engine_threads == 1
    try:
        assert ctx.engine.client.health()  # starts the embedded engine
        assert ctx._embedded is not None
        assert ctx._embedded.server.engine.sampler.num_threads == 1
    finally:
        ctx.close()


def test_embedded_engine_loads_only_with_its_token(ctx: StageContext) -> None:
    """With no token configured, the worker's loopback engine still guards load/unload with
    a random one: another local process cannot swap what the worker samples from."""
    from workers.serving.client import SGLangClient, SGLangError

    engine = ctx.engine
    url = engine.client.base_url
    with pytest.raises(SGLangError) as refused:
        SGLangClient(url).unload_lora_adapter("anything")
    assert refused.value.status == 401
    with pytest.raises(SGLangError) as wrong:
        SGLangClient(url, api_key="guess").load_lora_adapter("x", "/tmp/x")
    assert wrong.value.status == 401
    with pytest.raises(SGLangError) as not_loaded:  # the worker's own client gets past auth
        engine.client.unload_lora_adapter("anything")
    assert not_loaded.value.status == 400 and "anything" in not_loaded.value.message
