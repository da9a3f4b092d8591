"""Token log-probs of one packed training pass: the decoder once over the shared-prefix
sequences (`workers.training.sharedprefix`), the LM head only where a completion token is
predicted.

Apart from the trainer because this is the pass's numerics (the mask per layer type, the head in
chunks, the temperature), which the trainer's bookkeeping (policies, optimizers, rejections)
only calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from workers.training.sharedprefix import Packed

HEAD_CHUNK = 256
"""Completion positions per LM-head chunk: a [chunk, vocab] logits is the most the head holds at
once (a frozen head's `HeadLogp` keeps none of it; a head that trains keeps each chunk's
log-softmax for backward, unless the pass recomputes)."""


def frozen_head(head: Any) -> bool:
    """A plain linear head that trains nothing (LoRA targets no head here): `HeadLogp` fits."""
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


class HeadLogp(torch.autograd.Function):
    """log_softmax((h W^T + b) / T)[t] through a frozen head, its gradient made in forward.

    A token's log-prob depends on its own hidden state alone, so its gradient is one vector,
    (W[t] - softmax W) / T, computed here from the logits already at hand and kept in place of
    the vocab-wide log-softmax autograd would keep (576 floats a completion token instead of
    49,152 for SmolLM2), and backward makes no vocab-wide temporaries. The FLOPs are those of
    forward + backward through the head.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, temperature: float, out_dtype: torch.dtype,
                want_grad: bool) -> torch.Tensor:
        logits = F.linear(h, weight, bias).to(out_dtype)  # a new tensor: changed in place
        if temperature != 1.0:
            logits.div_(temperature)
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        if want_grad:
            probs = logp_all.exp_().to(weight.dtype)
            grad = (weight[targets] - probs @ weight).to(out_dtype)
            ctx.save_for_backward(grad / temperature if temperature != 1.0 else grad)
        ctx.h_dtype = h.dtype
        return logp

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        dh = (grads[0][:, None] * grad).to(ctx.h_dtype)
        return dh, None, None, None, None, None, None


def sliding_window(config: Any) -> int | None:
    """The window of a model whose layers mix full and sliding-window attention, else None."""
    types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    return int(window) if window and "sliding_attention" in types else None


def packed_mask(packed: Packed, dtype: torch.dtype,
                sliding: int | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed block mask; models with sliding-window layers (GPT-OSS) get the mapping
    transformers takes per layer type, so those layers keep their window here too."""
    full = packed.attention_mask(dtype)
    if sliding is None:
        return full
    return {"full_attention": full,
            "sliding_attention": packed.attention_mask(dtype, window=sliding)}


def packed_logps(base: PreTrainedModel, packed: Packed, shape: tuple[int, int], *,
                 temperature: float, dtype: torch.dtype, sliding: int | None,
                 keep_head: bool) -> torch.Tensor:
    """Token log-probs in the batch's [B, L-1] layout (as `token_logps`). A frozen head keeps
    one hidden-wide gradient a token for backward (`HeadLogp`). Any other head: `keep_head`
    keeps each chunk's log-softmax for backward (4 bytes x vocab a token); else the chunk is
    recomputed in backward, so a big pass never holds more than one chunk."""
    decoder = getattr(base, base.base_model_prefix)
    hidden = decoder(input_ids=packed.ids, position_ids=packed.positions,
                     attention_mask=packed_mask(packed, dtype, sliding),
                     use_cache=False).last_hidden_state
    picked = hidden[packed.seq, packed.pos]
    head = base.get_output_embeddings()
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).to(out_dtype)
        if temperature != 1.0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)

    targets = packed.targets
    if frozen_head(head):
        want_grad = torch.is_grad_enabled() and picked.requires_grad
        parts = [HeadLogp.apply(picked[i:i + HEAD_CHUNK], head.weight, head.bias,
                                targets[i:i + HEAD_CHUNK], temperature, out_dtype, want_grad)
                 for i in range(0, len(targets), HEAD_CHUNK)]
    else:
        parts = [chunk_logps(picked[i:i + HEAD_CHUNK], targets[i:i + HEAD_CHUNK]) if keep_head
                 else checkpoint(chunk_logps, picked[i:i + HEAD_CHUNK],
                                 targets[i:i + HEAD_CHUNK], use_reentrant=False)
                 for i in range(0, len(targets), HEAD_CHUNK)]
    flat = torch.cat(parts) if parts else picked.new_zeros(0, dtype=out_dtype)
    out = torch.zeros(shape, dtype=out_dtype, device=flat.device)
    return out.index_put((packed.rows, packed.cols), flat)
