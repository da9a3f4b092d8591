"""What a worker checks before it consumes anything: a base it can train and serve.

A base outside the architecture registry (GPT-2, Falcon, Phi-3's fused projections, ...) or
LoRA targets that select nothing would otherwise fail on every event, one dead letter at a time,
or, worse, train only some layers. So a process that runs a model stage refuses to start, with
one message naming the architecture and what is supported; nothing is consumed, so nothing is
dead-lettered and the events wait for a correctly configured worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from infra.settings import Settings

if TYPE_CHECKING:
    from workers.models.registry import LoraTargets

MODEL_STAGES = frozenset({"rollout", "update", "export", "evaluate"})
"""Stages that load, train, export for or sample from the base."""


class StartupRefused(RuntimeError):
    """The configured base (or its LoRA targets) cannot be trained here: do not start."""


def check_base(settings: Settings, stages: Iterable[str]) -> LoraTargets | None:
    """The base's resolved LoRA targets, or StartupRefused with one clear message. Stages that
    never touch the model (reward, promote), or no configured base, pass unchecked."""
    if settings.base_model is None or not MODEL_STAGES & set(stages):
        return None
    from workers.models import registry
    from workers.models.base import resolve_base

    try:
        path = resolve_base(settings.base_model)
        return registry.check_base(path, settings.lora_targets)
    except (registry.UnsupportedArchitecture, registry.BadTargets) as exc:
        raise StartupRefused(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise StartupRefused(f"cannot read base model {settings.base_model}: {exc}") from exc
