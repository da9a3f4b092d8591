"""The engine's length-bucketed prefill and per-adapter deltas change nothing but the cost.

Rows of very different prompt lengths, several adapters and the base, in a shuffled order: the
batch is prefilled in buckets (each at its own width, its KV placed in one left-padded cache)
and the adapters' deltas run per adapter group. Each row must get what it gets alone (greedy
tokens and their log-probs), which is what the one-width, masked-delta batch gave.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.adapters import make_adapter
from workers.serving import slot_linear
from workers.serving.prefill import prefill_buckets
from workers.serving.sampler import RowRequest, SlotSampler
from workers.serving.slot_linear import RowGroups


def test_buckets_cover_every_row_once_and_keep_batch_order() -> None:
    lengths = [3, 40, 4, 41, 3, 39, 5]
    buckets = prefill_buckets(lengths, cost=8)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in buckets)
    assert sorted(sorted(lengths[i] for i in b) for b in buckets) == [[3, 3, 4, 5], [39, 40, 41]]
    assert prefill_buckets([7, 7, 8, 7], cost=8) == [[0, 1, 2, 3]]  # nothing worth a forward
    assert prefill_buckets([]) == []


@pytest.mark.parametrize("segment_min_tokens", [1, 10**9])  # per-adapter deltas, masked ones
def test_bucketed_mixed_batch_equals_each_row_alone(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        segment_min_tokens: int) -> None:
    monkeypatch.setattr(slot_linear, "SEGMENT_MIN_TOKENS", segment_min_tokens)
    sampler = SlotSampler(tiny_model_dir, num_slots=3, max_rank=8)
    sampler.load(0, make_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=1))
    sampler.load(2, make_adapter(tiny_model_dir, tmp_path / "b", rank=8, seed=2))
    gen = torch.Generator().manual_seed(0)
    vocab = sampler.model.config.vocab_size
    lengths = [2, 30, 3, 28, 2, 31, 4, 29]
    slots: list[int | None] = [2, 0, None, 2, 0, None, 0, 2]
    rows = [RowRequest(torch.randint(3, vocab, (n,), generator=gen).tolist(), slot,
                       max_new_tokens=5, temperature=0.0, ignore_eos=True)
            for n, slot in zip(lengths, slots, strict=True)]
    assert len(prefill_buckets(lengths)) > 1  # the batch does take the bucketed path
    batch = sampler.generate(rows)
    for row, got in zip(rows, batch, strict=True):
        alone = sampler.generate([row])[0]
        assert got.output_ids == alone.output_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs),
                                   atol=1e-5, rtol=1e-5)


def test_row_groups_pad_short_groups_and_leave_base_rows_out() -> None:
    cpu = torch.device("cpu")
    groups = RowGroups.of([2, 0, None, 2, 0, 0], [0, 2], cpu)
    assert groups.size == 3
    assert groups.gather is not None and groups.real is not None and groups.rows is not None
    assert groups.gather.tolist() == [1, 4, 5, 0, 3, 0]  # adapter 2's short group repeats row 0
    assert groups.real.tolist() == [0, 1, 2, 3, 4]
    assert groups.rows.tolist() == [1, 4, 5, 0, 3]
    plain = RowGroups.of([0, 0, 1, 1], [0, 1], cpu)  # already D equal contiguous groups
    assert (plain.size, plain.gather, plain.real, plain.rows) == (2, None, None, None)
