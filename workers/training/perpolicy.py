"""What one policy may configure for itself in the shared multi-policy trainer: its adapter's
shape (rank, alpha, target modules), learning rate and loss hyperparameters.

The trainer wraps the pipeline's target modules once (`MultiLora.install`); a policy that
targets only some of them (say attention only) still gets a slot in every wrapped layer, but
the slots of the layers it does not target keep B = 0 and are frozen (not trained, not in its
optimiser, not exported), so their delta is exactly zero and the exported adapter is the one a
peft model with those targets would hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.models.base import LoraSpec
from workers.training.multilora import PEFT_PREFIX, MultiLora


@dataclass(frozen=True)
class PolicyTraining:
    """One policy's own configuration in the trainer (the pipeline's settings are defaults)."""

    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 1e-2
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 0.0


def untargeted_layers(multi: MultiLora, lora: LoraSpec) -> set[str]:
    """Wrapped layers (module paths) the policy's targets leave out: a linear is targeted by its
    registry group or its leaf name, a fused expert bank by `experts`
    (`workers.models.registry.resolve`)."""
    from workers.models.registry import parse_targets

    tokens = set(parse_targets(list(lora.target_modules)))
    out = {name for name, group in multi.targets.linears
           if group not in tokens and name.rsplit(".", 1)[-1] not in tokens}
    return out | ({n for n in multi.experts} if "experts" not in tokens else set())


def trainable(multi: MultiLora, slot: int, params: list[torch.nn.Parameter],
              lora: LoraSpec) -> list[torch.nn.Parameter]:
    """Freeze the slot's parameters in untargeted layers; return the ones it trains."""
    frozen = untargeted_layers(multi, lora)
    if not frozen:
        return params
    off: set[int] = set()
    for name in frozen:
        layer = multi.linears.get(name) or multi.experts[name]
        off |= {id(p) for p in layer.lora_A.values()} | {id(p) for p in layer.lora_B.values()}
    for p in params:
        if id(p) in off:
            p.requires_grad_(False)
    return [p for p in params if id(p) not in off]


def _is_frozen_key(key: str, frozen: set[str]) -> bool:
    path = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0].removesuffix(".base_layer")
    return path in frozen


def export_targeted(multi: MultiLora, slot: int, lora: LoraSpec) -> dict[str, torch.Tensor]:
    """The slot as a peft state dict with only the policy's targeted layers."""
    state = multi.export(slot)
    frozen = untargeted_layers(multi, lora)
    return {k: v for k, v in state.items() if not _is_frozen_key(k, frozen)}


def complete(multi: MultiLora, slot: int, lora: LoraSpec,
             tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A targeted-only state dict completed with the slot's frozen (zero-delta) layers, as
    `MultiLora.load` wants every wrapped layer; extra or missing targeted keys stay for its
    check."""
    frozen = untargeted_layers(multi, lora)
    if not frozen:
        return tensors
    extra = sorted(k for k in tensors if _is_frozen_key(k, frozen))
    if extra:
        raise ValueError(f"adapter has layers the policy does not target: {extra[:3]}")
    current = multi.export(slot)
    return {**{k: v for k, v in current.items() if _is_frozen_key(k, frozen)}, **tensors}
