"""The CPU engine's model side: one frozen base, adapter slots, mixed-adapter batched sampling.

Log-probs follow LocalEngine's contract (they are GRPO's `old` term): log_softmax(logits / T)
of the raw logits, no other logit processing; T = 0 means greedy, with log_softmax(logits).
Each row of a batch names its own slot, so requests for different adapters share one forward
pass per decode step. A row stops on any end id the model declares (`workers.models.chat.end_ids`:
tokenizer, config and generation config) or on its `stop_token_ids`, unless `ignore_eos` (then,
as in SGLang, it runs to `max_new_tokens`). The base is prepared by the architecture registry as
the trainer's is (DSA's tie-stable top-k) and decodes with a cache of the layer types it
declares (`DynamicCache(config=...)`: DSA needs indexed layers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from workers.models.base import LoraSpec, load_base_model
from workers.models.chat import end_ids
from workers.models.dsa import new_cache
from workers.models.packed import PackedLinear, own_memory, pack_head
from workers.models.registry import prepare
from workers.serving.prefill import merge_left_padded, plain_layers, prefill_buckets
from workers.serving.slots import SlotLora


@dataclass(frozen=True)
class RowRequest:
    """One sequence to sample: prompt ids, the slot (None = base) and its sampling params."""

    input_ids: list[int]
    slot: int | None
    max_new_tokens: int = 16
    temperature: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclass
class RowResult:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    matched_stop: int | None = None


class SlotSampler:
    """Base model + SlotLora; every model call holds `lock` (loads and forwards never overlap)."""

    def __init__(self, base_path: Path, *, num_slots: int, max_rank: int,
                 target_modules: Iterable[str] = LoraSpec().target_modules,
                 dtype: torch.dtype = torch.float32, num_threads: int | None = None,
                 device: str = "cpu") -> None:
        self.model, self.tokenizer = load_base_model(Path(base_path), device=device)
        self.device = torch.device(device)
        # Set on every call, in whichever thread makes it: OpenMP's and MKL's counts are per
        # thread, and `torch.get_num_threads()` reports the process-wide default, which any
        # thread may have changed since, not the calling thread's own count.
        self.num_threads = num_threads or torch.get_num_threads()
        # float32 by default: rollout log-probs must match the float32 trainer's. bfloat16
        # serves (as SGLang does) about twice as fast on CPUs with AVX512-BF16 or AMX.
        nn.Module.to(self.model, dtype)  # in place (transformers' `to` is typed narrower)
        prepare(self.model)
        self.slots = SlotLora.install(self.model, target_modules, num_slots=num_slots,
                                      max_rank=max_rank)
        pack_head(self.model)  # the engine never trains: packed weights replace the modules,
        if any(isinstance(m, PackedLinear) for m in self.model.modules()):
            own_memory(self.model)  # and the loaded file's mapping can go
        self.eos_ids = end_ids(self.tokenizer, self.model)
        self.pad_id: int = self.tokenizer.pad_token_id or 0
        self.lock = threading.Lock()

    def load(self, slot: int, adapter_dir: Path) -> None:
        with self.lock:
            torch.set_num_threads(self.num_threads)
            self.slots.load_dir(slot, adapter_dir)

    def clear(self, slot: int) -> None:
        with self.lock:
            self.slots.clear(slot)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @torch.inference_mode()
    def generate(self, rows: list[RowRequest]) -> list[RowResult]:
        """Left-padded batched decoding with a KV cache; rows stop independently."""
        if not rows:
            return []
        # Rows grouped by adapter: each adapter's delta is then one slice of the batch
        # (`SlotContext.segments`), rather than every adapter's rank over every row.
        order = sorted(range(len(rows)), key=lambda i: (rows[i].slot is not None,
                                                        rows[i].slot or 0))
        grouped = [rows[i] for i in order]
        with self.lock:
            torch.set_num_threads(self.num_threads)
            self.slots.ctx.set_rows([r.slot for r in grouped])
            self.slots.ctx.threads = self.num_threads
            try:
                results = self._decode(grouped)
            finally:
                self.slots.ctx.clear()
        by_row = dict(zip(order, results, strict=True))
        return [by_row[i] for i in range(len(rows))]

    def _decode(self, rows: list[RowRequest]) -> list[RowResult]:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[i, width - len(r.input_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        steps = max(r.max_new_tokens for r in rows)
        # one token: no later step reads a cache (DSA models build their own for the prefill)
        cache = new_cache(self.model.config) if steps > 1 else None
        gens = [_generator(r.seed) for r in rows]
        results = [RowResult() for _ in rows]
        done = [False] * len(rows)
        logits = self._prefill(ids, mask, pos, cache, [len(r.input_ids) for r in rows])
        for step in range(steps):
            tokens = self._sample_step(logits, rows, gens, results, done, step)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            assert cache is not None
            logits = self._forward(tokens[:, None], mask, pos, cache)
        return results

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | None, lengths: list[int]) -> torch.Tensor:
        """The prompts' forward, in length buckets when that saves padding: a left-padded
        batch runs every row at the longest prompt's width, and on a CPU a padded token costs
        what a real one does. Each bucket runs at its own width; its KV is then placed at the
        right end of the batch's cache, where the batch's mask already expects it."""
        buckets = prefill_buckets(lengths)
        if len(buckets) == 1 or cache is None or not plain_layers(cache):
            return self._forward(ids, mask, pos, cache)
        width = ids.shape[1]
        logits: list[torch.Tensor | None] = [None] * len(lengths)
        parts = []
        ctx = self.slots.ctx
        slots = ctx.row_slots
        for rows in buckets:
            w = max(lengths[i] for i in rows)
            part = new_cache(self.model.config)
            ctx.set_rows([slots[i] for i in rows])
            index = torch.tensor(rows)
            out = self._forward(ids[index, width - w:], mask[index, width - w:],
                                pos[index, width - w:], part)
            for i, row in enumerate(rows):
                logits[row] = out[i]
            parts.append((index, w, part))
        ctx.set_rows(slots)
        merge_left_padded(cache, parts, len(lengths), width)
        return torch.stack([t for t in logits if t is not None])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | None) -> torch.Tensor:
        # Only the last position's logits are sampled: skip the LM head everywhere else.
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=cache,
                         use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float().cpu()

    def _sample_step(self, logits: torch.Tensor, rows: list[RowRequest],
                     gens: list[torch.Generator | None], results: list[RowResult],
                     done: list[bool], step: int) -> torch.Tensor:
        """One token for every live row. Greedy rows take the logits' argmax and every row's
        log-prob is its logit less the row's logsumexp, over the whole batch at once: a per-row
        loop, and even a batch-wide log-softmax (a second [rows, vocab] tensor written), cost
        5% of a 64-row decode. Sampled rows draw one by one, each from its own generator."""
        temps = [r.temperature if r.temperature > 0.0 else 1.0 for r in rows]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, dtype=logits.dtype)[:, None]
        tokens = torch.argmax(logits, dim=-1)
        for i, r in enumerate(rows):
            if r.temperature > 0.0 and not done[i]:
                probs = torch.softmax(logits[i], dim=-1)
                tokens[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
        tokens[torch.tensor(done, dtype=torch.bool)] = self.pad_id
        chosen = (logits.gather(-1, tokens[:, None])[:, 0]
                  - torch.logsumexp(logits, dim=-1)).tolist()
        for i, (r, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if done[i]:
                continue
            res = results[i]
            res.output_ids.append(tok)
            res.logprobs.append(chosen[i])
            if not r.ignore_eos and (tok in self.eos_ids or tok in r.stop_token_ids):
                res.matched_stop = tok
                done[i] = True
            elif step + 1 >= r.max_new_tokens:
                done[i] = True
        return tokens


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
