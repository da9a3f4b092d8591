"""The batched multi-LoRA layer against peft as the oracle (float64).

peft refuses mixed-adapter batches in training mode, so the oracle runs each adapter's rows in
its own pass; the multi-LoRA model runs all rows (several policies and a base-only row) in one
pass, and its logits and per-policy gradients must match peft's.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft import get_peft_model_state_dict

from workers.models.base import LoraSpec, load_base_model
from workers.training.multilora import MultiLora

TARGETS = LoraSpec().target_modules
ROW_ADAPTERS: list[int | None] = [0, 1, 2, None, 1, 0, 2]


def _grad(param: torch.Tensor) -> torch.Tensor:
    assert param.grad is not None
    return param.grad.clone()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, vocab, (len(ROW_ADAPTERS), 9), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding on a few rows, as the trainer pads
    attention[4, 4:] = 0
    return ids, attention


def _peft_oracle(
    path: Path, ranks: list[int], ids: torch.Tensor, attention: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """Per-adapter passes through peft: logits per row, adapter states, gradients per adapter."""
    base, _ = load_base_model(path)
    base = base.double()
    torch.manual_seed(0)
    model: peft.PeftModel | None = None
    for i, r in enumerate(ranks):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=list(TARGETS),
                                 lora_dropout=0.0, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    assert model is not None
    model.double()
    logits = torch.zeros(*ids.shape, model.config.vocab_size, dtype=torch.float64)
    states, grads = {}, {}
    for i in range(len(ranks)):
        model.set_adapter(f"a{i}")
        rows = [j for j, a in enumerate(ROW_ADAPTERS) if a == i]
        out = model(input_ids=ids[rows], attention_mask=attention[rows]).logits
        (out * weights[rows]).sum().backward()
        logits[rows] = out.detach()
        named = dict(model.named_parameters())
        states[i] = get_peft_model_state_dict(model, adapter_name=f"a{i}")
        grads[i] = {k: _grad(named[k.replace(".weight", f".a{i}.weight")]) for k in states[i]}
    rows = [j for j, a in enumerate(ROW_ADAPTERS) if a is None]
    with model.disable_adapter(), torch.no_grad():
        logits[rows] = model(input_ids=ids[rows], attention_mask=attention[rows]).logits
    return logits, states, grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("ranks", [[1, 1, 1], [8, 8, 8], [1, 8, 1]])
def test_mixed_batch_matches_peft_logits_and_grads(
    tiny_model_dir: Path, ranks: list[int], checkpointing: bool
) -> None:
    base, _ = load_base_model(tiny_model_dir)
    base = base.double()
    ids, attention = _batch(base.config.vocab_size)
    weights = torch.randn(*ids.shape, base.config.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    weights *= attention[..., None]
    want_logits, states, want_grads = _peft_oracle(tiny_model_dir, ranks, ids, attention, weights)

    multi = MultiLora.install(base, TARGETS)
    params = {i: multi.add_slot(i, r, 2.0 * r + 1) for i, r in enumerate(ranks)}
    absent = multi.add_slot(9, 4, 8.0)  # in the model, not in the batch
    for i in params:
        multi.load(i, states[i])
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()
    calls = []
    first = next(iter(multi.linears.values()))
    first.register_forward_hook(lambda *_: calls.append(1))
    with multi.route(ROW_ADAPTERS):
        logits = base(input_ids=ids, attention_mask=attention, use_cache=False).logits
        (logits * weights).sum().backward()
    assert len(calls) == (2 if checkpointing else 1)  # checkpointing really recomputed

    valid = attention.bool()
    torch.testing.assert_close(logits[valid], want_logits[valid], rtol=1e-10, atol=1e-10)
    for i in params:
        got = _slot_grads(multi, i)
        assert set(got) == set(want_grads[i])
        for key, grad in want_grads[i].items():
            torch.testing.assert_close(got[key], grad, rtol=1e-9, atol=1e-11)
    assert all(p.grad is None for p in absent)


def _slot_grads(multi: MultiLora, slot: int) -> dict[str, torch.Tensor]:
    """A slot's gradients under the peft saved-key names of the parameters they belong to."""
    out = {}
    for name, layer in multi.linears.items():
        for kind, params in (("A", layer.lora_A), ("B", layer.lora_B)):
            grad = params[f"s{slot}"].grad
            assert grad is not None
            out[f"base_model.model.{name}.lora_{kind}.weight"] = grad
    return out


def test_single_policy_fast_path_and_base_rows(tiny_model_dir: Path) -> None:
    """All rows on one slot take the unmasked path; all-None rows are the bare base."""
    base, _ = load_base_model(tiny_model_dir)
    ids = torch.randint(4, base.config.vocab_size, (3, 6),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    multi = MultiLora.install(base, TARGETS)
    multi.add_slot(0, 4, 8.0, torch.Generator().manual_seed(0))
    multi.add_slot(1, 2, 4.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in multi.linears.values():
            layer.lora_B["s0"].normal_(0, 0.1)
            layer.lora_B["s1"].normal_(0, 0.1)
        with multi.route([None, None, None]):
            torch.testing.assert_close(base(input_ids=ids).logits, plain)
        with multi.route([0, 0, 0]):
            single = base(input_ids=ids).logits
        with multi.route([0, 1, None]):
            mixed = base(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], plain[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[1], single[1])
    with pytest.raises(KeyError):
        multi.routing.set([5], torch.float32)
