"""Packing a joint step's policies into passes under an activation budget."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from workers.training.grpo import TrainGroup, make_batch
from workers.training.multipass import concat, pack, token_activation_mb


def test_pack_keeps_order_and_whole_policies_within_the_budget() -> None:
    shapes = [(6, 10), (6, 12), (6, 8), (12, 20), (2, 5)]
    # 1 MiB a token: (6+6)*12 = 144 fits 150; adding (6, 8) would be 18*12 = 216
    assert pack(shapes, 1.0, 150.0) == [[0, 1], [2], [3], [4]]
    assert pack(shapes, 1.0, None) == [[0, 1, 2, 3, 4]]
    assert pack(shapes, 1.0, 0.0) == [[0], [1], [2], [3], [4]]  # over budget: alone
    assert pack([], 1.0, 10.0) == []


def test_token_estimate_scales_with_layers_widths_and_dtype() -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    mb = token_activation_mb(config, torch.float32)
    assert mb == 2 * (8 * 64 + 4 * 128) * 4 / 2**20
    assert token_activation_mb(config, torch.float64) == 2 * mb


def test_concat_right_pads_each_policy_batch() -> None:
    a = make_batch([TrainGroup([1, 2], [[3], [4, 5]], [[-1.0], [-1.0, -2.0]], [0.0, 1.0])], 0)
    b = make_batch([TrainGroup([7], [[8, 9, 10]], [[-3.0, -3.0, -3.0]], [2.0])], 0)
    both = concat([a, b], pad_id=0)
    assert both.ids.tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [7, 8, 9, 10]]
    assert both.cmask.sum(dim=1).tolist() == [1, 2, 3]
    assert both.old.shape == (3, 3) and both.adv.shape == (3,)
