"""DeepSeek Sparse Attention (DSA) as both the trainer and the sampler must run it.

The DSA indexer (DeepSeek-V3.2, GLM-5) scores every earlier key with a sum of ReLU terms and
keeps the top `index_topk`. ReLU makes many scores exactly 0, and `torch.topk` breaks such ties
differently depending on the row's length: a prefill of 7 tokens and a forward over 8 can keep
different keys for the same query, and the sampler's log-probs (prefill + decode) then differ
from the trainer's (one full forward) by up to ~0.1 on a tiny model (measured; see the tests).
That is a training/serving mismatch GRPO's ratio would read as policy change.

The fix here: each indexer's top-k breaks ties by key position (a stable descending sort, so the
earliest keys win), which does not depend on how many keys a row has, so a full forward, a
left-padded prefill and a KV-cached decode select the same keys. Scores that are not tied are
ordered as before, so this is still the model's DSA, only with a deterministic tie rule. SGLang's
DSA kernels use their own top-k, so an SGLang sampler can still disagree with the trainer on
tied keys: its rollouts' log-probs are then off-policy by that much (documented, not hidden).

DSA models also need a cache with an indexer-key store (`DynamicCache(config=...)`): a bare
`DynamicCache()` raises "Cannot call `update_indexer`..." on their first layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache, PretrainedConfig


class StableTopk(TorchFunctionMode):
    """Inside this mode `topk` keeps the earliest of tied entries (stable descending sort)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.topk or func is torch.topk:
            return stable_topk(*args, **kwargs)
        return func(*args, **kwargs)


def stable_topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True,
                sorted: bool = True) -> Any:
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def _stable(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with StableTopk():
            return forward(*args, **kwargs)

    run._lorastream_stable_topk = True  # type: ignore[attr-defined]
    return run


def stabilize_indexers(model: nn.Module) -> int:
    """Give every DSA indexer of `model` the tie-stable top-k; returns how many (idempotent)."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("Indexer") and hasattr(module, "index_topk"):
            if not getattr(module.forward, "_lorastream_stable_topk", False):
                module.forward = _stable(module.forward)  # type: ignore[method-assign]
            count += 1
    return count


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A KV cache with the layer types the model declares (indexed layers for DSA)."""
    return DynamicCache(config=config)
