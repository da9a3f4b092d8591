"""Users' own objectives through the real stages (real Redis, catalog topic, tiny model): a
reward plugin installed as a package trains a policy; an HTTP judge scores through the reward
agent and its failures are retryable dead letters; SFT targets and DPO pairs (explicit, or two
logged responses paired by feedback) reach the trainer; a policy's configuration record sets
its objective, reward, rank, targets and learning rate, and names itself in provenance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import RewardEndpoint, Settings
from schemas import DeadLetter, InteractionLogged, RolloutGenerated, RolloutRewarded, decode_event
from schemas.codec import encode_event
from schemas.errors import PoisonEventError
from schemas.events import AdapterEvaluated, AdapterExported, PolicyPromoted, PolicyUpdated
from streams.sdk.policies import CatalogError, create_policy
from tests.support.plugins import install_plugin, uninstall
from tests.support.stages import all_of, in_process_stage, only
from workers.catalog.read import revisions_of
from workers.pipeline.context import StageContext
from workers.pipeline.export import export
from workers.pipeline.reward import reward
from workers.pipeline.rollout import rollout, rollout_many
from workers.pipeline.update import update
from workers.reference.judge import Judge

pytestmark = pytest.mark.run_settings(export_every=1, group_size=4, max_new_tokens=6)


@pytest.fixture
def ctx(run: Settings) -> Iterator[StageContext]:
    c = StageContext.create(run)
    yield c
    c.close()
    c.catalog.close()


def _chain(ctx: StageContext, interactions: list[InteractionLogged]) -> PolicyUpdated:
    rollouts = [r for i in interactions for r in rollout(ctx, i)]
    rewarded = [w for r in all_of(RolloutGenerated, rollouts)
                for w in all_of(RolloutRewarded, reward(ctx, r))]
    return only(PolicyUpdated, update(ctx, rewarded))


def test_an_installed_reward_plugin_trains_a_policy(run: Settings, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "site")))
    try:
        ctx = StageContext.create(run)  # a worker starting after the plugin was installed
        assert "monotone" in ctx.rewards
        up = _chain(ctx, [InteractionLogged(policy_id="m", prompt=f"say {i}?", task="monotone")
                          for i in range(2)])
        assert up.reward_fns == {"monotone": 3} and up.step == 1
        (exp,) = export(ctx, up)
        assert isinstance(exp, AdapterExported)
        (rev,) = revisions_of(ctx.settings, ctx.catalog.entry("m"))
        assert rev["provenance"]["reward_fns"] == [{"name": "monotone", "version": 3}]
        with pytest.raises(PoisonEventError, match=r"unknown reward function 'monotones'; "
                                                   r"known: .*monotone, reference"):
            rollout(ctx, InteractionLogged(policy_id="m", prompt="x?", task="monotones"))
        ctx.close()
        ctx.catalog.close()
    finally:
        uninstall()


async def test_an_http_judge_scores_through_the_reward_agent(run: Settings) -> None:
    judge = Judge()
    url = await judge.start()
    settings = run.model_copy(update={"reward_endpoints": {
        "my-judge": RewardEndpoint(url=url, version=2, retries=1, backoff_s=0.01,
                                   max_groups_per_call=2)}})
    agent, runner = in_process_stage(settings, "reward")
    sink, dlq = runner.sink.__aiter__(), runner.dead_letters.__aiter__()
    good = [_rollout("j", f"q{i}") for i in range(3)]
    try:
        async with agent.test_context() as tctx:
            for ro in good:
                await tctx.put(encode_event(ro), key=b"j")
            outs = [decode_event(RolloutRewarded, (await sink.get(timeout=10)).value)
                    for _ in good]
            assert judge.calls >= 2 and judge.groups == 3
            await judge.stop()  # the judge goes away: its groups must not get a reward
            down = _rollout("j", "down")
            await tctx.put(encode_event(down), key=b"j")
            letter = decode_event(DeadLetter, (await dlq.get(timeout=30)).value)
    finally:
        await judge.stop()
        await runner.ctx.rewards.get("my-judge").close()  # type: ignore[attr-defined]
    assert [o.rollout.event_id for o in outs] == [r.event_id for r in good]
    assert all(o.reward_fn == "my-judge" and o.reward_version == 2 for o in outs)
    assert outs[0].rewards == pytest.approx([1.0, 8 / 11])  # the judge's length scores
    assert letter.retryable and letter.error_type == "RetryableError"
    assert "my-judge" in letter.error and "after 2 attempt(s)" in letter.error
    assert sink.empty()  # type: ignore[attr-defined]


def _rollout(policy: str, prompt: str) -> RolloutGenerated:
    from schemas.events import Completion

    inter = InteractionLogged(policy_id=policy, prompt=prompt, task="my-judge")
    return RolloutGenerated(policy_id=policy, interaction=inter, revision=0, prompt_ids=[1, 2],
                            completions=[Completion(text=t, token_ids=[5] * max(1, len(t)),
                                                    logprobs=[-1.0] * max(1, len(t)))
                                         for t in ("", "abc")], temperature=1.0)


def test_sft_targets_and_dpo_pairs_reach_the_trainer(ctx: StageContext) -> None:
    sft = [InteractionLogged(policy_id="s", prompt="a?", objective="sft", reference="yes"),
           InteractionLogged(policy_id="s", prompt="b?", objective="sft", response="ok",
                             feedback=0.5)]
    disliked = InteractionLogged(policy_id="s", prompt="c?", objective="sft", response="no",
                                 feedback=-1.0)
    assert rollout(ctx, disliked) == []  # not a target: skipped, never trained on
    with pytest.raises(PoisonEventError, match="sft needs a target"):
        rollout(ctx, InteractionLogged(policy_id="s", prompt="d?", objective="sft"))
    up = _chain(ctx, sft)
    assert up.objectives == {"sft": 2} and up.reward_fns == {"target": 1}
    assert ctx.state.in_flight("s") == 0  # logged data takes no in-flight slot

    liked = InteractionLogged(policy_id="d", prompt="p?", objective="dpo", response="good",
                              feedback=1.0, task="feedback")
    same = liked.model_copy(update={"event_id": "same-rating"})
    worse = InteractionLogged(policy_id="d", prompt="p?", objective="dpo", response="bad",
                              feedback=-0.5)
    assert rollout(ctx, liked) == [] and rollout(ctx, same) == []  # waiting for a partner
    (pair,) = rollout(ctx, worse)
    assert isinstance(pair, RolloutGenerated) and pair.objective == "dpo"
    assert [c.text for c in pair.completions] == ["good", "bad"]
    assert pair.partner is not None and pair.partner.event_id == liked.event_id
    (again,) = rollout(ctx, worse)  # redelivered: the same pair again
    assert again.model_dump(exclude={"ts"}) == pair.model_dump(exclude={"ts"})
    assert rollout(ctx, liked) == []  # used as a partner: nothing of its own
    explicit = InteractionLogged(policy_id="d", prompt="q?", objective="dpo", chosen="yes",
                                 rejected="no no")
    (pair2,) = rollout_many(ctx, [explicit])
    rewarded = [w for r in all_of(RolloutGenerated, [pair, pair2])
                for w in all_of(RolloutRewarded, reward(ctx, r))]
    assert [w.rewards for w in rewarded] == [[1.0, 0.0]] * 2
    up2 = only(PolicyUpdated, update(ctx, rewarded))
    assert up2.objectives == {"dpo": 2}
    assert up2.reward_fns == {"preference": 1}


def test_a_policy_configuration_drives_its_training_and_its_provenance(
        ctx: StageContext) -> None:
    settings = ctx.settings
    first = create_policy(settings, "cfg", objective="sft", rank=1, alpha=4.0,
                          targets=["attn"], learning_rate=0.05, reward="length")
    assert first is not None and first.training.objective == "sft"
    assert create_policy(settings, "cfg", objective="sft", rank=1, alpha=4.0, targets=["attn"],
                         learning_rate=0.05, reward="length") is None  # unchanged: no record
    held = InteractionLogged(policy_id="cfg", prompt="h?", task="nope", split="eval")
    assert rollout(ctx, held) == []  # scored by the policy's reward, so its task may be anything
    train = InteractionLogged(policy_id="cfg", prompt="t?", task="nope", reference="yes")
    up = _chain(ctx, [train])  # the policy's objective: sft, without saying so in the log
    config = ctx.configs.get("cfg")
    assert up.objectives == {"sft": 1} and up.config_id == config.config_id
    assert up.config["lora_rank"] == 1 and up.config["learning_rate"] == 0.05
    (exp,) = export(ctx, up)
    assert isinstance(exp, AdapterExported) and (exp.rank, exp.alpha) == (1, 4.0)
    adapter = json.loads((Path(exp.path) / "adapter_config.json").read_text())
    assert adapter["r"] == 1 and sorted(adapter["target_modules"]) == [
        "k_proj", "o_proj", "q_proj", "v_proj"]  # attention only, as peft names them
    create_policy(settings, "cfg", objective="sft", rank=1, alpha=4.0, targets=["attn"],
                  learning_rate=0.01, reward="length")  # a new record: a new configuration
    ctx.configs.forget("cfg")
    up2 = _chain(ctx, [train.model_copy(update={"event_id": "again"})])
    assert up2.config_id != up.config_id and up2.config["learning_rate"] == 0.01
    export(ctx, up2)
    revs = revisions_of(settings, ctx.catalog.entry("cfg"))
    assert [r["provenance"]["configs"] for r in revs] == [[up.config_id], [up2.config_id]]
    assert revs[1]["provenance"]["hyperparameters"]["learning_rate"] == 0.01
    assert revs[1]["provenance"]["hyperparameters"]["lora_rank"] == 1
    with pytest.raises(CatalogError, match="shape is fixed"):
        create_policy(settings, "cfg", objective="sft", rank=4)


def test_the_gate_selects_on_one_set_and_the_score_is_reported_on_another(
        ctx: StageContext) -> None:
    from tests.support.stages import export_step, promote_guarded
    from workers.pipeline.evaluate import evaluate
    from workers.pipeline.state import score_key, split_heldout

    held = [InteractionLogged(policy_id="e", prompt=f"held {i}?", task="length", split="eval")
            for i in range(12)]
    ctx.state.add_heldout_many(held)
    selection, test = split_heldout(ctx.state.heldout("e"))
    assert selection and test and not {h.event_id for h in selection} & {
        h.event_id for h in test}
    r1 = export_step(ctx, "e", 2)
    scores = {(0, "sel"): 0.30, (1, "sel"): 0.50, (0, "test"): 0.20, (1, "test"): 0.25}
    for (rev, part), score in scores.items():
        ctx.state.cache_score("e", score_key(rev, selection if part == "sel" else test), score)
    (ev,) = evaluate(ctx, r1)
    assert isinstance(ev, AdapterEvaluated)
    assert ev.passed and (ev.selection_score, ev.selection_baseline_score) == (0.50, 0.30)
    assert (ev.score, ev.baseline_score) == (0.25, 0.20)  # reported: the test set
    assert (ev.prompts, ev.selection_prompts) == (len(test), len(selection))
    promoted = only(PolicyPromoted, promote_guarded(ctx, ev))
    assert promoted.score == 0.25  # the demo's "reward after" is the test-set score
    r2 = export_step(ctx, "e", 4)  # better on the test set, not on the selection set
    more = {(2, "sel"): 0.45, (2, "test"): 0.9}
    for (rev, part), score in more.items():
        ctx.state.cache_score("e", score_key(rev, selection if part == "sel" else test), score)
    (ev2,) = evaluate(ctx, r2)
    assert isinstance(ev2, AdapterEvaluated)
    assert not ev2.passed and ev2.score == 0.9 and promote_guarded(ctx, ev2) == []
