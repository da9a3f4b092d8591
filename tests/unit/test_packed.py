"""oneDNN-packed base weights change the cost of a forward, not its result.

A packed linear equals `F.linear` to float32 rounding; the CPU engine's base projections and
head are packed (their originals gone), a bfloat16 engine is left alone, and the trainer's
rollout sampler draws the same tokens with its packed head as with the model's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.adapters import make_adapter
from workers.models.base import LoraSpec
from workers.models.packed import (
    PackedLinear,
    own_memory,
    pack_linear,
    packed_head,
    using_head,
)
from workers.serving import sampler as sampler_module
from workers.serving import slot_linear
from workers.serving.sampler import RowRequest, SlotSampler
from workers.serving.slot_linear import SlotLinear
from workers.training.multisample import SampleRequest, sample_many
from workers.training.multitrainer import MultiPolicyTrainer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).requires_grad_(False)
    x = torch.randn(3, 5, 48)
    packed = pack_linear(linear)
    assert isinstance(packed, PackedLinear)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias),
                               rtol=1e-5, atol=1e-5)


def test_only_frozen_float32_linears_are_packed() -> None:
    assert isinstance(pack_linear(nn.Linear(4, 4)), nn.Linear)  # trainable
    half = nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    assert pack_linear(half) is half


def test_engine_packs_its_base_and_serves_what_f_linear_gives(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = SlotSampler(tiny_model_dir, num_slots=2, max_rank=8)
    slot_linears = [m for m in sampler.model.modules() if isinstance(m, SlotLinear)]
    assert slot_linears and all(isinstance(m.base, PackedLinear) for m in slot_linears)
    assert isinstance(sampler.model.lm_head, PackedLinear)
    assert not any(type(m) is nn.Linear for m in sampler.model.modules())  # originals gone
    half = SlotSampler(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.bfloat16)
    assert not any(isinstance(m, PackedLinear) for m in half.model.modules())
    monkeypatch.setattr(slot_linear, "pack_linear", lambda linear: linear)
    monkeypatch.setattr(sampler_module, "pack_head", lambda model: False)
    reference = SlotSampler(tiny_model_dir, num_slots=2, max_rank=8)  # the same on F.linear
    assert not any(isinstance(m, PackedLinear) for m in reference.model.modules())
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", rank=4, seed=1)
    for s in (sampler, reference):
        s.load(0, adapter)
    rows = [RowRequest([5, 6, 7, 8], slot, max_new_tokens=6, temperature=0.0, ignore_eos=True)
            for slot in (0, None)]
    for got, want in zip(sampler.generate(rows), reference.generate(rows), strict=True):
        assert got.output_ids == want.output_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                   atol=1e-5, rtol=1e-5)


def test_trainer_samples_the_same_with_its_packed_head(tiny_model_dir: Path) -> None:
    trainer = MultiPolicyTrainer(tiny_model_dir, LoraSpec(rank=2))
    head = packed_head(trainer.base)
    assert head is not None
    requests = [SampleRequest([5, 6, 7], None, 3), SampleRequest([9, 4], None, 2)]

    def sample(with_head: nn.Module | None) -> list[list[tuple[list[int], list[float]]]]:
        out = sample_many(trainer.base, trainer.multi, requests, max_new_tokens=6, eos_ids=(),
                          pad_id=0, seed=4, head=with_head)
        return [[(c.token_ids, c.logprobs) for c in g] for g in out]

    original = trainer.base.lm_head
    packed, plain = sample(head), sample(None)
    assert trainer.base.lm_head is original  # lent for the call only
    for g_packed, g_plain in zip(packed, plain, strict=True):
        for (ids_a, lp_a), (ids_b, lp_b) in zip(g_packed, g_plain, strict=True):
            assert ids_a == ids_b
            torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b),
                                       atol=1e-5, rtol=1e-5)


def test_using_head_restores_the_model_head_after_an_error() -> None:
    model = nn.Module()
    model.lm_head = nn.Linear(2, 2)
    original = model.lm_head
    with pytest.raises(RuntimeError), using_head(model, nn.Identity()):
        assert isinstance(model.lm_head, nn.Identity)
        raise RuntimeError("boom")
    assert model.lm_head is original


def test_own_memory_copies_what_is_left_and_keeps_ties() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as a causal LM's head and embedding
    model.register_buffer("scale", torch.arange(3.0))
    before = {n: (t.data_ptr(), t.clone()) for n, t in [*model.named_parameters(),
                                                        *model.named_buffers()]}
    own_memory(model)
    assert model[1].weight is model[0].weight
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        ptr, value = before[name]
        assert tensor.data_ptr() != ptr
        assert torch.equal(tensor, value)
