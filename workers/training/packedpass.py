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
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from workers.training.sharedprefix import Packed

HEAD_CHUNK = 256
"""Completion positions per LM-head chunk: a [chunk, vocab] logits is the most the head holds at
once beyond what backward keeps (each chunk's log-softmax, unless the pass recomputes)."""


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
    """Token log-probs in the batch's [B, L-1] layout (as `token_logps`). `keep_head` keeps
    each head chunk's log-softmax for backward (~4 bytes x vocab a token: small beside a decoder
    token's activations); else the chunk is recomputed in backward, so a big pass never holds
    more than one chunk."""
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
    parts = [chunk_logps(picked[i:i + HEAD_CHUNK], targets[i:i + HEAD_CHUNK]) if keep_head
             else checkpoint(chunk_logps, picked[i:i + HEAD_CHUNK],
                             targets[i:i + HEAD_CHUNK], use_reentrant=False)
             for i in range(0, len(targets), HEAD_CHUNK)]
    flat = torch.cat(parts) if parts else picked.new_zeros(0, dtype=out_dtype)
    out = torch.zeros(shape, dtype=out_dtype, device=flat.device)
    return out.index_put((packed.rows, packed.cols), flat)
