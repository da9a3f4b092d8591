"""Length-bucketed prefill for the CPU engine: fewer padded tokens, the same KV cache.

A batch of prompts is left-padded to its longest one, and every padded position runs through
the whole model. On a CPU that is real work (one token of SmolLM2-135M is ~0.2 GFLOP), so the
sampler prefills rows of similar length together and places each bucket's keys and values at
the right end of one left-padded cache, which is exactly where the batch's attention mask and
position ids expect them; decoding then proceeds as one batch.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

BUCKET_COST_TOKENS = 24
"""A bucket's fixed cost (one more forward over every layer), in padded tokens it must save."""


def prefill_buckets(lengths: list[int], cost: int = BUCKET_COST_TOKENS) -> list[list[int]]:
    """Row indices grouped into buckets of similar prompt length, minimising padded tokens plus
    `cost` per bucket (dynamic programming over the rows sorted by length). Within a bucket
    rows keep their batch order, so rows grouped by adapter stay grouped."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: the first j sorted rows bucketed
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of rows i..j-1
        for i in range(j):
            total = best[i] + (j - i) * width + cost
            if total < best[j]:
                best[j], cut[j] = total, i
    buckets: list[list[int]] = []
    j = n
    while j > 0:
        buckets.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return buckets[::-1]


def plain_layers(cache: DynamicCache) -> bool:
    """Only full-attention layers (no sliding window, no indexer) can be merged by position."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def merge_left_padded(cache: DynamicCache, parts: list[tuple[torch.Tensor, int, DynamicCache]],
                      rows: int, width: int) -> None:
    """Fill the empty `cache` with every bucket's layers: bucket rows `index`, prefilled at
    their own width `w`, go to positions width-w..width-1 (zeros elsewhere, masked out)."""
    for layer in range(len(parts[0][2].layers)):
        merged = []
        for kind in ("keys", "values"):
            first: torch.Tensor = getattr(parts[0][2].layers[layer], kind)
            out = first.new_zeros(rows, first.shape[1], width, first.shape[3])
            for index, w, part in parts:
                out[index, :, width - w:] = getattr(part.layers[layer], kind)
            merged.append(out)
        cache.update(merged[0], merged[1], layer)
