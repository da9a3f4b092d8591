"""A policy's effective configuration over the settings, its cache, and the held-out split."""

from __future__ import annotations

from typing import Any

from infra.settings import Settings
from schemas.events import InteractionLogged
from workers.pipeline.configs import PolicyConfigs, effective, expand_targets
from workers.pipeline.state import MIN_SPLIT, split_heldout


def test_unset_values_are_the_settings() -> None:
    s = Settings(learning_rate=0.02, lora_rank=4, lora_alpha=8.0, kl_beta=0.1, dpo_beta=0.3)
    default = effective(s, None, None)
    assert (default.objective, default.reward, default.learning_rate, default.lora_rank,
            default.kl_beta, default.dpo_beta) == ("grpo", None, 0.02, 4, 0.1, 0.3)
    own = effective(s, {"rank": 1, "alpha": 32.0, "target_modules": ["q_proj"]},
                    {"objective": "dpo", "learning_rate": 5e-5, "reward": "judge"})
    assert (own.objective, own.lora_rank, own.lora_alpha, own.lora_targets) == (
        "dpo", 1, 32.0, ("q_proj",))
    assert own.learning_rate == 5e-5 and own.kl_beta == 0.1
    assert own.config_id != default.config_id and len(own.config_id) == 16
    it = InteractionLogged(policy_id="p", prompt="q", task="length")
    assert (own.reward_for(it), default.reward_for(it)) == ("judge", "length")
    assert own.objective_for(it) == "dpo"
    assert own.objective_for(it.model_copy(update={"objective": "sft"})) == "sft"
    assert expand_targets(["attn", "q_proj", "mlp", "attn"]) == ("attn", "q_proj", "mlp")
    assert expand_targets(["all"]) == ("attn", "mlp", "shared", "experts")


class _Index:
    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.reads = 0

    def configs_many(self, policies: list[str]) -> dict[str, Any]:
        self.reads += 1
        return {p: self.rows.get(p) for p in policies}


def test_the_cache_reads_a_batch_once_and_refreshes_after_its_max_age() -> None:
    now = [0.0]
    index = _Index()
    configs = PolicyConfigs(Settings(), index, max_age_s=1.0,  # type: ignore[arg-type]
                            clock=lambda: now[0])
    assert set(configs.get_many(["a", "b", "a"])) == {"a", "b"} and index.reads == 1
    index.rows["a"] = ({"rank": 2}, {"objective": "sft"})
    assert configs.get("a").objective == "grpo" and index.reads == 1  # cached
    now[0] = 1.5
    assert configs.get("a").objective == "sft" and index.reads == 2


def test_held_out_prompts_split_stably_into_selection_and_test() -> None:
    held = [InteractionLogged(policy_id="p", prompt=f"h{i}", split="eval") for i in range(40)]
    few = held[:MIN_SPLIT - 1]
    assert split_heldout(few) == (few, few)
    selection, test = split_heldout(held[:20])
    assert selection and test and len(selection) + len(test) == 20
    more_sel, more_test = split_heldout(held)
    assert set(map(id, selection)) <= set(map(id, more_sel))  # a prompt keeps its set
    assert set(map(id, test)) <= set(map(id, more_test))
