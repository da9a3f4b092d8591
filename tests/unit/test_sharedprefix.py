"""Shared-prefix packing: the layout, and log-probs/gradients equal to the row layout's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from workers.models.base import LoraSpec
from workers.training import packedpass
from workers.training.grpo import TrainGroup, make_batch
from workers.training.multipass import concat
from workers.training.multitrainer import MultiPolicyTrainer
from workers.training.sharedprefix import packed_shape, share_prefixes


def _group(prompt: list[int], completions: list[list[int]]) -> TrainGroup:
    return TrainGroup(prompt, completions, [[-1.0] * len(c) for c in completions],
                      [float(i) for i in range(len(completions))])


def test_rows_of_one_prompt_and_slot_share_one_sequence() -> None:
    batch = make_batch([_group([5, 6], [[7], [8, 9]]), _group([5], [[3, 4]])], pad_id=0)
    packed = share_prefixes(batch, [0, 0, 0], pad_id=0)
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9], [5, 3, 4, 0, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 0, 0]]
    assert packed.slots == [0, 0]
    # token 8 (second completion) sees the prompt and itself, not the first completion's 7
    assert packed.allowed[0, 3].tolist() == [True, True, False, True, False]
    assert packed.allowed[1, 4].tolist() == [False, False, False, False, True]  # pad: itself
    # first completion tokens are predicted by the prompt's last position, shared by both rows
    assert list(zip(packed.seq.tolist(), packed.pos.tolist(), packed.targets.tolist(),
                    packed.rows.tolist(), packed.cols.tolist(), strict=True)) == [
        (0, 1, 7, 0, 1), (0, 1, 8, 1, 1), (0, 3, 9, 1, 2), (1, 0, 3, 2, 0), (1, 1, 4, 2, 1)]
    assert packed_shape(batch) == (2, 5)
    # the same prompt under another slot (policy) is never shared
    assert len(share_prefixes(batch, [0, 1, 0], pad_id=0).slots) == 3


def _rms_norm_in_input_dtype(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("head", ["fused", "autograd, kept", "autograd, recomputed"])
def test_packed_logps_and_grads_equal_the_row_layout(tiny_model_dir: Path, head: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 throughout: HF's RMSNorm computes in float32, which would round a shared
    prompt's summed gradient once instead of each row's separately (~1e-7 apart). The frozen
    head's fused log-probs (`HeadLogp`) and autograd's, kept or recomputed, all match."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    if head != "fused":
        monkeypatch.setattr(packedpass, "frozen_head", lambda _: False)
    keep_head = head != "autograd, recomputed"
    trainer = MultiPolicyTrainer(tiny_model_dir, LoraSpec(), dtype=torch.float64,
                                 temperature=0.7)
    assert packedpass.frozen_head(trainer.base.get_output_embeddings()) == (head == "fused")
    gen = torch.Generator().manual_seed(0)
    batches, slots = [], []
    for policy, prompts in {"a": [[1, 2, 3], [4]], "b": [[1, 2, 3]]}.items():
        slot = trainer._policy(policy).slot
        with torch.no_grad():
            for p in trainer._policies[policy].params:
                p.normal_(0.0, 0.05, generator=gen)  # B != 0: the adapters matter
        groups = [_group(pr, [torch.randint(5, 60, (n,), generator=gen).tolist()
                              for n in (3, 1, 4)]) for pr in prompts]
        batches.append(make_batch(groups, trainer._pad_id))
        slots += [slot] * batches[-1].ids.shape[0]
    batch = concat(batches, trainer._pad_id)
    weights = torch.randn(batch.ids.shape[0], batch.ids.shape[1] - 1, generator=gen,
                          dtype=torch.float64)
    params = [p for policy in ("a", "b") for p in trainer._policies[policy].params]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, params))

    with trainer.multi.route(slots):
        logits = trainer.base(input_ids=batch.ids, attention_mask=batch.attention).logits
        lp = torch.log_softmax(logits[:, :-1] / 0.7, dim=-1)  # token_logps, but in float64
        rows = lp.gather(-1, batch.ids[:, 1:, None]).squeeze(-1) * batch.cmask[:, 1:]
        expected = grads((rows * weights).sum())
    packed = share_prefixes(batch, list(slots), trainer._pad_id)
    assert packed.tokens < batch.ids.numel()
    with trainer.multi.route(packed.slots):
        rows_n, width = weights.shape
        got = trainer._logps(packed, (rows_n, width), keep_head=keep_head)
        actual = grads((got * weights).sum())
    torch.testing.assert_close(got, rows, rtol=0, atol=1e-12)
    for g, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_log_probs_and_gradient_match_autograd(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, dtype=torch.float64).requires_grad_(False)
    h = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (5,), generator=gen)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    want = torch.log_softmax(head(h) / temperature, -1).gather(-1, t[:, None]).squeeze(-1)
    (want_dh,) = torch.autograd.grad((want * g).sum(), [h])
    got = packedpass.HeadLogp.apply(h, head.weight, head.bias, t, temperature, torch.float64,
                                    True)
    (saved,) = got.grad_fn.saved_tensors
    assert saved.shape == (5, 8)  # one hidden-wide vector a token, not a vocab-wide one
    (got_dh,) = torch.autograd.grad((got * g).sum(), [h])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-10, atol=1e-12)
    assert packedpass.frozen_head(head) and not packedpass.frozen_head(
        torch.nn.Linear(8, 50))  # a trained head takes autograd's path
