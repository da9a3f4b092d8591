"""The objectives a policy trains with, beside GRPO: SFT and DPO, and how one policy's groups of
any mix of them become one loss in the multi-policy step.

- `grpo`: `workers.training.grpo.grpo_loss` (clipped ratio against the sampler's log-probs,
  optional k3 KL to the base), normalised by the policy's GRPO completion tokens.
- `sft`: token-level cross-entropy on the completion tokens only (the prompt is context),
  averaged over the policy's SFT completion tokens: TRL's `SFTTrainer` with completion-only
  loss (`loss_type="nll"`).
- `dpo`: a group is one pair, row 0 the chosen and row 1 the rejected completion of one
  prompt; `-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))` averaged over pairs, with
  sequence log-probs summed over completion tokens and the reference from the base with the
  adapter disabled: TRL's `DPOTrainer` (`loss_type="sigmoid"`, reverse KL, no label
  smoothing); with `dpo_sft_weight` w > 0, plus w x the chosen completions' mean token NLL
  (RPO: TRL's `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, w]`).

A policy's loss is the sum of its objectives' losses, each normalised within itself, and the
multi-policy trainer sums policies' losses (their parameters are disjoint), so a joint step of
policies with different objectives is each policy's own step. The math is checked against
TRL's own trainers in float64 (`tests/unit/test_objectives.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F

from schemas.errors import PoisonEventError
from workers.training.grpo import TrainGroup, grpo_loss
from workers.training.perpolicy import PolicyTraining

Objective = Literal["grpo", "sft", "dpo"]
OBJECTIVES: tuple[Objective, ...] = ("grpo", "sft", "dpo")
NEEDS_REFERENCE = frozenset({"dpo"})
"""Objectives whose loss needs the base model's log-probs (GRPO does only with a KL term)."""


def needs_reference(training: PolicyTraining, parts: Sequence[Part]) -> bool:
    return training.kl_beta > 0 or any(p.objective in NEEDS_REFERENCE for p in parts)


@dataclass(frozen=True)
class Part:
    """Rows `start:end` of a policy's batch, all of one objective."""

    objective: Objective
    start: int
    end: int


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (`logp` is 0 elsewhere)."""
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's completion log-probability: token log-probs summed over the completion."""
    return (logp * mask.to(logp.dtype)).sum(dim=-1)


def dpo_loss(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, beta: float,
             sft_weight: float = 0.0) -> torch.Tensor:
    """Sigmoid DPO over pairs laid out as rows (chosen, rejected, chosen, rejected, ...), plus
    `sft_weight` x the chosen completions' mean token NLL (RPO; TRL's
    `loss_type=["sigmoid", "sft"]`): DPO alone may lower both answers' likelihood, the NLL term
    keeps the chosen one likely."""
    ratio = sequence_logps(logp, mask) - sequence_logps(ref.to(logp.dtype), mask)
    delta = ratio[0::2] - ratio[1::2]
    loss = -F.logsigmoid(beta * delta).mean()
    if sft_weight:
        loss = loss + sft_weight * sft_loss(logp[0::2], mask[0::2])
    return loss


def order_groups(groups: Sequence[TrainGroup]) -> tuple[list[TrainGroup], list[Part]]:
    """A policy's groups ordered by objective (stable), and the row range of each objective
    in the batch `make_batch` lays them out in (one row per completion)."""
    ordered = sorted(groups, key=lambda g: OBJECTIVES.index(_objective(g)))
    parts: list[Part] = []
    row = 0
    for g in ordered:
        n, objective = len(g.completions), _objective(g)
        if parts and parts[-1].objective == objective:
            parts[-1] = Part(objective, parts[-1].start, row + n)
        else:
            parts.append(Part(objective, row, row + n))
        row += n
    return ordered, parts


def _objective(group: TrainGroup) -> Objective:
    objective = getattr(group, "objective", "grpo")
    if objective not in OBJECTIVES:
        raise PoisonEventError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if objective == "dpo" and len(group.completions) != 2:
        raise PoisonEventError(f"a dpo group is one pair (chosen, rejected), not "
                               f"{len(group.completions)} completions")
    return cast(Objective, objective)


def policy_loss(parts: Sequence[Part], training: PolicyTraining, logp: torch.Tensor,
                old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss, KL to the base of the GRPO rows) of one policy's rows in the [B, L-1] layout."""
    total: torch.Tensor | None = None
    kl = 0.0
    for part in parts:
        s, e = part.start, part.end
        m = mask[s:e]
        r = None if ref is None else ref[s:e]
        if part.objective == "grpo":
            loss = grpo_loss(logp[s:e], old[s:e].to(logp.dtype), r, adv[s:e], m,
                             training.clip_eps, training.clip_eps, training.kl_beta)
            if r is not None and training.kl_beta > 0:
                d = (r - logp[s:e]).detach()
                kl = float(((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp(min=1))
        elif part.objective == "sft":
            loss = sft_loss(logp[s:e], m)
        else:
            if r is None:
                raise RuntimeError("dpo needs the reference log-probs")
            loss = dpo_loss(logp[s:e], r, m, training.dpo_beta, training.dpo_sft_weight)
        total = loss if total is None else total + loss
    if total is None:
        raise PoisonEventError("a step needs at least one group")
    return total, kl
