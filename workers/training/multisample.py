"""Mixed-policy sampling: one batched, KV-cached generation pass for many policies' rollouts.

Every row names its policy slot (or None for the bare base) through `MultiLora.route`, so K
policies' G completions come out of one prefill and one decode loop over the shared base. The
prefill runs once per request (the G completions of one prompt and policy share its KV cache,
which is then repeated per row): a group's prompt is not recomputed G times. The log-prob of
each chosen token is log_softmax(logits / T), exactly GRPO's `old` term as the trainer computes
it (no top-k/top-p or other logit processing).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from workers.models.packed import using_head
from workers.training.multilora import MultiLora


@dataclass(frozen=True)
class SampleRequest:
    """`n` completions of one prompt from one slot (None = base model)."""

    prompt_ids: list[int]
    slot: int | None
    n: int


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finished: bool


@dataclass
class _State:
    """The rows' decode state after the prefill: next-token logits, KV cache, mask, positions."""

    logits: torch.Tensor  # [rows, vocab]
    cache: Cache
    attention: torch.Tensor  # [rows, length]
    positions: torch.Tensor  # [rows, 1]: the last position so far


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    return ids, attention


def _draw(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverse CDF: one uniform per row. torch.multinomial draws an
    exponential per vocabulary entry, which dominated a wide batch's decode step on CPU. The
    CDF is accumulated in place: a wide batch's [rows, vocab] temporaries are what the decode
    loop allocates each step, and fewer of them keep the sampler's peak memory down."""
    cdf = logp.exp().cumsum_(dim=-1)
    u = torch.rand(logp.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0].clamp(max=logp.shape[-1] - 1)


@torch.no_grad()
def _prefill(model: PreTrainedModel, multi: MultiLora, requests: Sequence[SampleRequest],
             pad_id: int) -> _State:
    """One row per request, then every tensor repeated to one row per completion."""
    ids, attention = _left_pad([r.prompt_ids for r in requests], pad_id)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    device = model.device
    with multi.route([r.slot for r in requests]):
        out = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    rows = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(
        [r.n for r in requests]))
    cache = out.past_key_values
    cache.reorder_cache(rows.to(device))
    return _State(out.logits[rows.to(device), -1].cpu(), cache, attention[rows],
                  positions[rows, -1:])


@torch.no_grad()
def _decode(model: PreTrainedModel, state: _State, *, max_new_tokens: int, temperature: float,
            eos_ids: torch.Tensor, pad_id: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per step for every row; rows stop at EOS (then emit pad). No forward runs
    after the last token is drawn."""
    logits, attention, positions = state.logits, state.attention, state.positions
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    tokens, logps = [], []
    for step in range(max_new_tokens):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        tok = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long),
                          _draw(lp, generator))
        tokens.append(tok)
        logps.append(lp.gather(-1, tok[:, None])[:, 0])
        done |= torch.isin(tok, eos_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        positions = positions + 1
        device = model.device
        logits = model(input_ids=tok[:, None].to(device), attention_mask=attention.to(device),
                       position_ids=positions.to(device), past_key_values=state.cache,
                       use_cache=True).logits[:, -1].cpu()
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def sample_many(
    model: PreTrainedModel, multi: MultiLora, requests: Sequence[SampleRequest], *,
    max_new_tokens: int, temperature: float = 1.0, eos_ids: Collection[int], pad_id: int,
    seed: int | None = None, head: nn.Module | None = None,
) -> list[list[Completion]]:
    """All requests' completions in one generation pass; result[i] holds request i's `n`.
    A row ends at the first of `eos_ids` (every end id the model declares; empty: never).
    `head` (a packed copy of the LM head, `workers.models.packed`) stands in for the model's."""
    if max_new_tokens < 1 or temperature <= 0.0 or any(r.n < 1 for r in requests):
        raise ValueError("need n >= 1, max_new_tokens >= 1, temperature > 0")
    if any(not r.prompt_ids for r in requests):
        raise ValueError("every request needs a non-empty prompt")
    if not requests:
        return []
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        with using_head(model, head):
            state = _prefill(model, multi, requests, pad_id)
            with multi.route([r.slot for r in requests for _ in range(r.n)]):
                tokens, logps = _decode(
                    model, state, max_new_tokens=max_new_tokens, temperature=temperature,
                    eos_ids=torch.tensor(sorted(eos_ids), dtype=torch.long), pad_id=pad_id,
                    generator=generator)
    finally:
        model.train(was_training)
    rows = []
    for row, row_lp in zip(tokens.tolist(), logps.tolist(), strict=True):
        end = next((i for i, t in enumerate(row) if t in eos_ids), None)
        length = len(row) if end is None else end + 1
        rows.append(Completion(row[:length], row_lp[:length], end is not None))
    out, start = [], 0
    for r in requests:
        out.append(rows[start:start + r.n])
        start += r.n
    return out
