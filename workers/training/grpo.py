"""GRPO's math and its inputs: group-relative advantages, token log-probs, the clipped loss,
and the padded batch a step trains on. The multi-policy trainer (`multitrainer.py`) and the
reference peft trainer (`workers/reference/trainer.py`) both build on these, so the two compute
one loss.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from schemas.errors import PoisonEventError, TrainingRejected


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (unbiased std + eps) over one group, as TRL; a 1-sample group gets 0."""
    rewards = rewards.double()
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-prob of each next token, [B, L-1]; logits[:, t] predicts ids[:, t+1]; prompt/pad -> 0."""
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * completion_mask[:, 1:]


def grpo_loss(
    logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
    mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
) -> torch.Tensor:
    """Clipped-ratio policy loss (+ k3 KL to ref), normalised by this policy's token count."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].to(logp.dtype)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta and ref is not None:
        d = ref - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    mask = mask.to(logp.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class TrainGroup:
    prompt_ids: list[int]
    completions: list[list[int]]
    old_logprobs: list[list[float]]
    rewards: list[float]
    objective: str = "grpo"
    """`grpo`, `sft` (completions are targets) or `dpo` (one pair: chosen, rejected);
    `workers/training/objectives.py`."""


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    mean_reward: float
    kl: float
    grad_norm: float
    tokens: int


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    attention: torch.Tensor
    cmask: torch.Tensor  # [B, L]: 1 on completion tokens
    old: torch.Tensor  # [B, L-1], aligned with token_logps
    adv: torch.Tensor  # [B]
    mean_reward: float


def policy_seed(seed: int, policy_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{policy_id}".encode()).digest()[:8], "big") >> 1


def validate_groups(groups: list[TrainGroup], vocab_size: int) -> None:
    """Bad shapes/ids are the event's fault (poison); non-finite rewards are a rejected step."""
    if not groups:
        raise PoisonEventError("a step needs at least one group")
    for g in groups:
        if not g.prompt_ids or not g.completions:
            raise PoisonEventError("a group needs prompt ids and at least one completion")
        if not (len(g.completions) == len(g.old_logprobs) == len(g.rewards)):
            raise PoisonEventError("completions, old_logprobs and rewards differ in length")
        for ids, lps in zip(g.completions, g.old_logprobs, strict=True):
            if len(ids) != len(lps):
                raise PoisonEventError("a completion's token ids and logprobs differ in length")
        for ids in (g.prompt_ids, *g.completions):
            if any(t < 0 or t >= vocab_size for t in ids):
                raise PoisonEventError("token id outside the vocabulary")
        if not all(math.isfinite(r) for r in g.rewards):
            raise TrainingRejected("non-finite reward in a group")


def make_batch(groups: list[TrainGroup], pad_id: int) -> Batch:
    """Right-padded prompt+completion rows; `old` is placed where token_logps puts each token."""
    rows = [(g.prompt_ids, c, lp) for g in groups
            for c, lp in zip(g.completions, g.old_logprobs, strict=True)]
    width = max(len(p) + len(c) for p, c, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    cmask = torch.zeros((len(rows), width))
    old = torch.zeros((len(rows), width - 1))
    for i, (prompt, comp, lps) in enumerate(rows):
        p, n = len(prompt), len(comp)
        ids[i, :p + n] = torch.tensor(prompt + comp, dtype=torch.long)
        attention[i, :p + n] = 1
        cmask[i, p:p + n] = 1
        old[i, p - 1:p - 1 + n] = torch.tensor(lps, dtype=torch.float32)
    adv = torch.cat([group_advantages(torch.tensor(g.rewards)) for g in groups]).float()
    rewards = [r for g in groups for r in g.rewards]
    return Batch(ids, attention, cmask, old, adv, sum(rewards) / len(rewards))
