"""Each policy's effective configuration: its `PolicyRegistered` record (`lorastream policy
create`) over the pipeline's settings, which stay the defaults.

The stages read it per batch through a small per-process cache (`PolicyConfigs`, one Redis
round trip for a batch's policies, refreshed after `MAX_AGE_S`), so a new configuration
record applies within about a second. What each stage takes from it:

- rollout: the objective of a log (`objective_for`: the interaction's own, else the policy's)
  and the reward (`reward_for`: the policy's, else the interaction's `task`);
- reward and evaluate: the reward; update: rank, alpha, targets, learning rate and loss knobs
  (`training`); export: the adapter's shape for its `adapter_config.json`.

A configuration's id (`config_id`) hashes its values; every step records it and its values,
and each revision's provenance names the ids of the steps it was made of.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import orjson

from infra.settings import Settings
from schemas.events import InteractionLogged, RolloutRewarded
from workers.catalog.index import CatalogIndex
from workers.models.base import LoraSpec

if TYPE_CHECKING:
    from workers.pipeline.context import StageContext
    from workers.training.perpolicy import PolicyTraining

MAX_AGE_S = 1.0
MAX_CACHED = 50_000
"""Beyond this many cached policies, entries older than `MAX_AGE_S` are dropped."""


@dataclass(frozen=True)
class PolicyConfig:
    """What one policy trains with, every value resolved."""

    objective: str
    reward: str | None
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    kl_beta: float
    clip_eps: float
    dpo_beta: float
    dpo_sft_weight: float

    @property
    def config_id(self) -> str:
        return hashlib.sha256(orjson.dumps(self.values(), option=orjson.OPT_SORT_KEYS)
                              ).hexdigest()[:16]

    def values(self) -> dict[str, float | int | str | bool | None]:
        """Named as the settings they override (`Settings.learning_rate`, `lora_rank`, ...)."""
        out: dict[str, Any] = asdict(self)
        out["lora_targets"] = ",".join(self.lora_targets)
        return out

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha,
                        target_modules=self.lora_targets)

    def training(self) -> PolicyTraining:
        """What the multi-policy trainer needs of it (imports torch: the update stage only)."""
        from workers.training.perpolicy import PolicyTraining

        return PolicyTraining(self.lora, self.learning_rate, self.clip_eps, self.kl_beta,
                              self.dpo_beta, self.dpo_sft_weight)

    def reward_for(self, interaction: InteractionLogged) -> str:
        """The policy's reward if it names one, else the one the interaction's task names."""
        return self.reward or interaction.task

    def objective_for(self, interaction: InteractionLogged) -> str:
        """The interaction's own objective if it says one, else the policy's."""
        return interaction.objective or self.objective


def effective(settings: Settings, lora: dict[str, Any] | None,
              training: dict[str, Any] | None) -> PolicyConfig:
    """A registered policy's configuration over the settings (None: not registered)."""
    t = training or {}
    spec = LoraSpec(rank=settings.lora_rank, alpha=settings.lora_alpha)
    lora = lora or {}

    def pick(key: str, default: Any) -> Any:
        value = t.get(key)
        return default if value is None else value

    return PolicyConfig(
        objective=pick("objective", "grpo"), reward=t.get("reward"),
        learning_rate=float(pick("learning_rate", settings.learning_rate)),
        lora_rank=int(lora.get("rank") or spec.rank),
        lora_alpha=float(lora.get("alpha") or spec.alpha),
        lora_targets=tuple(lora.get("target_modules") or spec.target_modules),
        kl_beta=float(pick("kl_beta", settings.kl_beta)),
        clip_eps=float(pick("clip_eps", settings.clip_eps)),
        dpo_beta=float(pick("dpo_beta", settings.dpo_beta)),
        dpo_sft_weight=float(pick("dpo_sft_weight", settings.dpo_sft_weight)),
    )


def expand_targets(names: Sequence[str]) -> tuple[str, ...]:
    """`attn,mlp`-style names as the registry's target tokens (groups `attn`, `mlp`, `shared`,
    `experts`, or leaf names; `all`: every group), in order without duplicates."""
    from workers.models.registry import parse_targets

    return parse_targets(list(names))


class PolicyConfigs:
    """Per-process cache of effective configurations, read from the catalog index."""

    def __init__(self, settings: Settings, index: CatalogIndex, *,
                 max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.index = settings, index
        self.max_age_s, self.clock = max_age_s, clock
        self._cache: dict[str, tuple[float, PolicyConfig]] = {}

    def get(self, policy_id: str) -> PolicyConfig:
        return self.get_many([policy_id])[policy_id]

    def get_many(self, policy_ids: Sequence[str]) -> dict[str, PolicyConfig]:
        now = self.clock()
        stale = [p for p in dict.fromkeys(policy_ids)
                 if p not in self._cache or now - self._cache[p][0] > self.max_age_s]
        if stale:
            if len(self._cache) > MAX_CACHED:
                self._cache = {p: v for p, v in self._cache.items()
                               if now - v[0] <= self.max_age_s}
            lookup = getattr(self.index, "configs_many", None)  # None: a stand-in index
            found = lookup(stale) if lookup is not None else dict.fromkeys(stale)
            for pid, got in found.items():
                lora, training = got if got is not None else (None, None)
                self._cache[pid] = (now, effective(self.settings, lora, training))
        return {p: self._cache[p][1] for p in policy_ids}

    def forget(self, policy_id: str) -> None:
        self._cache.pop(policy_id, None)


def configure_trainer(ctx: StageContext, policies: Sequence[str]) -> None:
    """Give the trainer each policy's configuration before it restores or steps them."""
    for policy, config in ctx.configs.get_many(policies).items():
        ctx.trainer.configure(policy, config.training())


def step_fields(ctx: StageContext, policy: str,
                events: Sequence[RolloutRewarded]) -> dict[str, Any]:
    """What a `PolicyUpdated` says of the configuration and objectives it trained with."""
    config = ctx.configs.get(policy)
    return {"objectives": dict(Counter(e.rollout.objective for e in events)),
            "config_id": config.config_id, "config": config.values()}
