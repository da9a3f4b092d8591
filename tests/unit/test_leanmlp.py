"""The memory-lean SwiGLU MLP: same forward and gradients as the plain module, less kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers.models.base import LoraSpec, load_base_model
from workers.models.tiny import build_tiny
from workers.training.leanmlp import make_mlps_lean
from workers.training.multilora import MultiLora

ROWS: list[int | None] = [0, 1, None, 0]


def _multi(path: Path) -> tuple[Any, MultiLora]:
    base, _ = load_base_model(path)
    base = base.double()
    multi = MultiLora.install(base, LoraSpec().target_modules)
    for slot, rank in ((0, 4), (1, 2)):
        multi.add_slot(slot, rank, 2.0 * rank, torch.Generator().manual_seed(slot))
    with torch.no_grad():
        for layer in multi.linears.values():
            for b in layer.lora_B.values():
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(b.numel()))
    return base, multi


def _plain(model: nn.Module) -> None:
    """Back to each MLP's own class forward (drop the lean instance attribute)."""
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward


def _run(model: Any, multi: MultiLora, ids: torch.Tensor, rows: list[int | None]
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, every gradient, and the bytes autograd kept for backward (distinct storages,
    weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with multi.route(rows), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(inputs_embeds=embeds).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
    assert embeds.grad is not None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = embeds.grad
    return logits.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("rows", [ROWS, [1, 1, 1, 1], [None, None, None, None]])
def test_lean_mlp_matches_the_plain_forward_and_gradients(tiny_model_dir: Path,
                                                          rows: list[int | None]) -> None:
    model, multi = _multi(tiny_model_dir)
    ids = torch.randint(4, model.config.vocab_size, (len(rows), 7),
                        generator=torch.Generator().manual_seed(3))
    lean = _run(model, multi, ids, rows)
    _plain(model)
    plain = _run(model, multi, ids, rows)
    assert torch.equal(lean[0], plain[0])  # the forward is the same ops in the same order
    assert lean[1].keys() == plain[1].keys()
    assert len(lean[1]) > 1 or all(r is None for r in rows)  # LoRA grads when a slot is used
    for name, grad in plain[1].items():
        torch.testing.assert_close(lean[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    # Per token and layer the plain MLP keeps gate, silu(gate), up and (when the down
    # projection has a LoRA delta) their product for backward; the lean one keeps gate and up.
    cfg = model.config
    wide = ids.numel() * cfg.intermediate_size * cfg.num_hidden_layers * 8
    assert plain[2] - lean[2] >= (wide if all(r is None for r in rows) else 2 * wide)


def test_only_llama_style_swiglu_mlps_switch(tiny_model_dir: Path, tmp_path: Path) -> None:
    dense, _ = load_base_model(tiny_model_dir)
    assert make_mlps_lean(dense) == dense.config.num_hidden_layers
    moe, _ = load_base_model(build_tiny("mixtral", tmp_path / "moe", hidden_size=32))
    assert make_mlps_lean(moe) == 0  # fused expert stacks keep their own forward
    gelu, _ = load_base_model(tiny_model_dir)
    for layer in gelu.model.layers:
        layer.mlp.act_fn = nn.GELU()
    assert make_mlps_lean(gelu) == 0
