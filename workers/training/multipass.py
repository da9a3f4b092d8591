"""How one joint step's policies are laid out into forward/backward passes.

A joint step packs whole policies, in order, into passes whose estimated activation memory stays
under a budget, and accumulates their gradients pass by pass. Parameters are disjoint and each
policy's loss is normalised by its own token count, so every policy's update is exactly its
separate step's however the policies are packed.

Why a budget rather than one pass over all K: a pass's activations grow with its tokens, and on
CPU recomputing them (checkpointing) costs more than a bigger pass wins back, so the budget is
what trades speed against peak memory. With shared prompts (`workers.training.sharedprefix`) and
the lean MLP (`workers.training.leanmlp`) the default packs two SmolLM2-135M policies a pass,
which keeps the multi-policy benchmark's peak RSS near training one policy after another; the
measurements behind it are in docs/performance.md ("Inside the trainer"). Tiny models pack many
policies per pass; accelerators, or a process with memory to spare, can raise the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from workers.training.grpo import Batch

PASS_ACTIVATION_MB = 160.0
"""Default budget (MiB of `token_activation_mb` x padded tokens) for one pass of a joint step:
two SmolLM2-135M policies at the pipeline defaults (2 x ~55 tokens x 1.23 MiB), not three."""


def token_activation_mb(config: PretrainedConfig, dtype: torch.dtype) -> float:
    """Estimated MiB one token keeps for backward in a non-checkpointed pass: per decoder layer
    ~8 hidden-wide tensors (norms, q/k/v/o inputs, attention) and ~4 MLP-wide ones (gate and up,
    which the lean MLP keeps, and backward's transients) of a Llama-style block. Rough and
    linear: it only guides packing."""
    width = 8 * int(config.hidden_size) + 4 * int(getattr(config, "intermediate_size", 0))
    return int(config.num_hidden_layers) * width * dtype.itemsize / 2**20


def pack(shapes: Sequence[tuple[int, int]], token_mb: float,
         budget_mb: float | None) -> list[list[int]]:
    """Indices of whole policies (`shapes`: each one's padded [rows, width]), in order, grouped
    into passes whose padded batch (all rows x the widest) is estimated within the budget. A
    policy over the budget gets a pass of its own; None packs everything into one pass."""
    passes: list[list[int]] = []
    rows = width = 0
    for i, (r, w) in enumerate(shapes):
        fits = budget_mb is None or (rows + r) * max(width, w) * token_mb <= budget_mb
        if passes and fits:
            passes[-1].append(i)
            rows, width = rows + r, max(width, w)
        else:
            passes.append([i])
            rows, width = r, w
    return passes


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """Stack per-policy batches (right-padded to one width) in the given order."""
    width = max(b.ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, w: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=value)

    return Batch(
        ids=torch.cat([pad(b.ids, width, pad_id) for b in batches]),
        attention=torch.cat([pad(b.attention, width, 0) for b in batches]),
        cmask=torch.cat([pad(b.cmask, width, 0) for b in batches]),
        old=torch.cat([pad(b.old, width - 1, 0) for b in batches]),
        adv=torch.cat([b.adv for b in batches]),
        mean_reward=0.0,
    )
