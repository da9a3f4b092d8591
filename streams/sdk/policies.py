"""Create or reconfigure a policy: its `PolicyRegistered` catalog record says how it trains.

```python
from pydantic import TypeAdapter

from infra.settings import Settings
from streams.sdk.policies import create_policy

create_policy(Settings(), "alice", objective="dpo", rank=1, alpha=32, learning_rate=5e-5,
              reward="my-judge", targets=["attn", "mlp"])
```

Anything left out takes the pipeline's setting (`LORASTREAM_*`) when the pipeline uses it, so
a policy configures only what differs; calling it again with other values records a new
configuration, which applies to the policy's next steps within about a second. The adapter's
shape (rank, alpha, targets) is fixed once the policy has a revision. Same as
`lorastream policy create ID --objective dpo --rank 1 --lr 5e-5 --reward my-judge --targets
attn,mlp`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import TypeAdapter

from infra.settings import Settings
from schemas.catalog import LoraConfig, PolicyRegistered, TrainingConfig
from schemas.events import Objective, PolicyId
from workers.catalog.writer import Catalog, CatalogError
from workers.models.base import LoraSpec
from workers.pipeline.configs import expand_targets
from workers.rewards.registry import Rewards


class PolicyConfigError(ValueError):
    """A configuration that cannot be recorded: says which value and why."""


def create_policy(settings: Settings, policy_id: str, *, objective: Objective = "grpo",
                  rank: int | None = None, alpha: float | None = None,
                  targets: Sequence[str] | None = None, learning_rate: float | None = None,
                  reward: str | None = None, kl_beta: float | None = None,
                  clip_eps: float | None = None, dpo_beta: float | None = None,
                  dpo_sft_weight: float | None = None,
                  namespace: str | None = None) -> PolicyRegistered | None:
    """Record the policy's configuration; returns the new record, or None if it was already
    exactly this. Raises `PolicyConfigError` for a bad value, `CatalogError` for a change the
    catalog refuses (another base model, a new shape after revisions)."""
    if settings.base_model is None:
        raise PolicyConfigError("no base model configured: set LORASTREAM_BASE_MODEL")
    modules = expand_targets(targets) if targets else LoraSpec().target_modules
    _check_targets(settings, modules)
    if reward is not None and reward not in (known := Rewards.load(settings)):
        raise PolicyConfigError(f"unknown reward {reward!r}; known here: "
                                f"{', '.join(known.names())}")
    try:
        TypeAdapter(PolicyId).validate_python(policy_id)
        lora = LoraConfig(rank=rank or settings.lora_rank,
                          alpha=settings.lora_alpha if alpha is None else alpha,
                          target_modules=modules)
        training = TrainingConfig(objective=objective, reward=reward,
                                  learning_rate=learning_rate, kl_beta=kl_beta,
                                  clip_eps=clip_eps, dpo_beta=dpo_beta,
                                  dpo_sft_weight=dpo_sft_weight)
    except ValueError as exc:
        raise PolicyConfigError(str(exc)) from exc
    from workers.catalog.provenance import cached_base_hash

    catalog = Catalog(settings)
    try:
        return catalog.configure(policy_id, base_model=str(settings.base_model),
                                 base_model_hash=cached_base_hash(str(settings.base_model)),
                                 lora=lora, training=training, namespace=namespace)
    finally:
        catalog.close()


__all__ = ["CatalogError", "PolicyConfigError", "create_policy"]


def _check_targets(settings: Settings, modules: Sequence[str]) -> None:
    """The targets must select layers of the base (groups `attn`, `mlp`, `shared`, `experts`,
    or leaf names), resolved on its skeleton as the trainer will resolve them."""
    from workers.models.registry import BadTargets, resolve, skeleton

    assert settings.base_model is not None
    try:
        resolve(skeleton(str(settings.base_model)), modules)
    except BadTargets as exc:
        raise PolicyConfigError(f"unknown target modules {list(modules)}: {exc}") from exc
