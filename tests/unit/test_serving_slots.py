"""The slot fast path must compute exactly what peft computes for the same adapter dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import peft
import pytest
import safetensors.torch
import torch

from tests.support.adapters import make_adapter
from workers.models.base import load_base_model
from workers.serving.sampler import RowRequest, SlotSampler
from workers.serving.slots import WEIGHTS_FILE, AdapterFormatError, SlotLora

PROMPTS = ["hello there", "a"]


def _peft_logits(base: Path, adapter: Path | None, ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    base_model, _ = load_base_model(base)
    model: torch.nn.Module = base_model
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(base_model, str(adapter))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _batch(sampler: SlotSampler) -> tuple[torch.Tensor, torch.Tensor]:
    enc = sampler.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _slot_logits(sampler: SlotSampler, slots: list[int | None], ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    sampler.slots.ctx.set_rows(slots)
    try:
        with torch.no_grad():
            return sampler.model(input_ids=ids, attention_mask=mask).logits
    finally:
        sampler.slots.ctx.clear()


def test_slot_logits_match_peft_single_and_mixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    a = make_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=1)
    b = make_adapter(tiny_model_dir, tmp_path / "b", rank=2, seed=2, targets=("q_proj", "v_proj"))
    sampler = SlotSampler(tiny_model_dir, num_slots=3, max_rank=8)
    sampler.load(0, a)
    sampler.load(2, b)
    ids, mask = _batch(sampler)
    want_a = _peft_logits(tiny_model_dir, a, ids, mask)
    want_b = _peft_logits(tiny_model_dir, b, ids, mask)
    want_base = _peft_logits(tiny_model_dir, None, ids, mask)
    assert not torch.allclose(want_a, want_base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(_slot_logits(sampler, [0, 0], ids, mask), want_a,
                               atol=1e-5, rtol=1e-5)
    mixed = _slot_logits(sampler, [2, None], ids, mask)  # rows with different adapters
    torch.testing.assert_close(mixed[0], want_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], want_base[1], atol=1e-5, rtol=1e-5)


def test_reload_slot_overwrites_and_clear_restores_base(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = make_adapter(tiny_model_dir, tmp_path / "b", seed=3, targets=("o_proj",))
    sampler = SlotSampler(tiny_model_dir, num_slots=1, max_rank=4)
    ids, mask = _batch(sampler)
    sampler.load(0, a)
    sampler.load(0, b)  # b targets fewer modules: a's other weights must be gone
    torch.testing.assert_close(_slot_logits(sampler, [0, 0], ids, mask),
                               _peft_logits(tiny_model_dir, b, ids, mask), atol=1e-5, rtol=1e-5)
    sampler.clear(0)
    torch.testing.assert_close(_slot_logits(sampler, [0, 0], ids, mask),
                               _peft_logits(tiny_model_dir, None, ids, mask), atol=1e-6, rtol=1e-6)


def test_packed_load_equals_per_tensor_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=4)
    sampler = SlotSampler(tiny_model_dir, num_slots=2, max_rank=4)
    sampler.load(0, a)
    sampler.slots.pack(a)
    sampler.load(1, a)  # now prefers the packed file
    assert torch.equal(sampler.slots.storage[0], sampler.slots.storage[1])
    assert sampler.slots.ctx.scales[0] == sampler.slots.ctx.scales[1] == 2.0


def test_adapter_that_does_not_fit_is_refused_and_slot_untouched(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    big = make_adapter(tiny_model_dir, tmp_path / "big", rank=8, seed=5)
    small = make_adapter(tiny_model_dir, tmp_path / "small", rank=2, seed=6)
    slots_model, _ = load_base_model(tiny_model_dir)
    slots = SlotLora.install(slots_model, ("q_proj",), num_slots=1, max_rank=4)
    with pytest.raises(AdapterFormatError):
        slots.load_dir(0, big)  # rank 8 > max rank 4
    with pytest.raises(AdapterFormatError):
        slots.load_dir(0, small)  # targets modules this engine does not wrap
    assert not slots.storage.any()


def test_generate_mixed_batch_is_seeded_and_reports_logprobs(tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=7)
    sampler = SlotSampler(tiny_model_dir, num_slots=2, max_rank=4)
    sampler.load(1, a)
    ids = sampler.encode("hi")
    rows = [RowRequest(ids, 1, max_new_tokens=5, seed=3), RowRequest(ids, None, 5, seed=3),
            RowRequest(ids, 1, max_new_tokens=3, temperature=0.0)]
    first, second = sampler.generate(rows), sampler.generate(rows)
    assert [r.output_ids for r in first] == [r.output_ids for r in second]
    for row, res in zip(rows, first, strict=True):
        assert 1 <= len(res.output_ids) <= row.max_new_tokens
        assert len(res.logprobs) == len(res.output_ids)
        assert all(lp <= 0.0 for lp in res.logprobs)
    alone = sampler.generate([rows[0]])[0]  # batching with others does not change a row
    assert alone.output_ids == first[0].output_ids
    torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(first[0].logprobs),
                               atol=1e-4, rtol=1e-4)


def test_sampled_logprobs_equal_teacher_forced_peft_logprobs(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """GRPO's `old` log-probs: the KV-cached, left-padded batch must match a plain forward."""
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=8)
    sampler = SlotSampler(tiny_model_dir, num_slots=1, max_rank=4)
    sampler.load(0, a)
    prompts = [sampler.encode("a longer prompt"), sampler.encode("hi")]
    rows = [RowRequest(p, 0, max_new_tokens=6, temperature=0.7, seed=i)
            for i, p in enumerate(prompts)]
    results = sampler.generate(rows)
    model, _ = load_base_model(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(model, str(a))
    for prompt, res in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt + res.output_ids])
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        logps = torch.log_softmax(logits / 0.7, dim=-1)
        want = logps.gather(-1, torch.tensor(res.output_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-4, rtol=1e-4)


def test_two_adapters_and_base_in_one_batch_match_peft(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """A mixed batch gathers only its distinct adapters; each row must still get its own."""
    a = make_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=11)
    b = make_adapter(tiny_model_dir, tmp_path / "b", rank=2, seed=12, targets=("q_proj", "v_proj"))
    sampler = SlotSampler(tiny_model_dir, num_slots=4, max_rank=4)
    sampler.load(3, a)
    sampler.load(1, b)
    prompts = ["hello there", "a", "hi you", "b"]
    enc = sampler.tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    got = _slot_logits(sampler, [1, None, 3, 1], ids, mask)
    wants = [_peft_logits(tiny_model_dir, adapter, ids, mask) for adapter in (b, None, a, b)]
    for row, want in enumerate(wants):
        torch.testing.assert_close(got[row], want[row], atol=1e-5, rtol=1e-5)


def test_full_rank_float32_file_is_read_straight_into_the_slot(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct read fills the same slot bytes as the per-tensor path, and never builds
    tensors (safetensors' loader is not called); a truncated file leaves the slot empty."""
    full = make_adapter(tiny_model_dir, tmp_path / "full", rank=4, seed=13)
    sampler = SlotSampler(tiny_model_dir, num_slots=2, max_rank=4)
    tensors = safetensors.torch.load_file(str(full / WEIGHTS_FILE))
    sampler.slots.load_tensors(0, tensors, 2.0)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the direct path must not build tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    sampler.load(1, full)
    assert torch.equal(sampler.slots.storage[0], sampler.slots.storage[1])
    assert sampler.slots.ctx.scales[1] == 2.0
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    data = (cut / WEIGHTS_FILE).read_bytes()
    (cut / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFormatError, match="truncated"):
        sampler.load(1, cut)
    assert not sampler.slots.storage[1].any() and sampler.slots.ctx.scales[1] == 0.0


def test_lora_delta_runs_on_one_thread_and_restores_the_forwards_count(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank-R matmuls are too small to split: one adapter's delta runs on one intra-op thread
    while the base matmuls keep the forward's count; a mixed batch's grouped deltas (batched
    matmuls, one group per adapter) keep it too. The logits are the same either way."""
    from workers.serving.slot_linear import SlotLinear

    sampler = SlotSampler(tiny_model_dir, num_slots=2, max_rank=4)
    sampler.load(0, make_adapter(tiny_model_dir, tmp_path / "a", seed=5))
    ids, mask = _batch(sampler)
    seen: dict[str, list[int]] = {"_add_delta": [], "_add_grouped": []}
    def spying(name: str) -> Any:
        real = getattr(SlotLinear, name)

        def spy(self: SlotLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen[name].append(torch.get_num_threads())
            return cast(torch.Tensor, real(self, x, y))
        return spy

    for name in seen:
        monkeypatch.setattr(SlotLinear, name, spying(name))

    batches: list[list[int | None]] = [[0, 0], [0, None]]  # one adapter; a mixed batch
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = [_slot_logits(sampler, rows, ids, mask) for rows in batches]
        torch.set_num_threads(2)
        sampler.slots.ctx.threads = 2
        for found in seen.values():
            found.clear()
        two_threads = [_slot_logits(sampler, rows, ids, mask) for rows in batches]
        assert torch.get_num_threads() == 2  # restored after every delta
    finally:
        torch.set_num_threads(before)
    assert seen["_add_delta"] and set(seen["_add_delta"]) == {1}
    assert seen["_add_grouped"] and set(seen["_add_grouped"]) == {2}
    for two, one in zip(two_threads, one_thread, strict=True):
        torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
