"""SFT and DPO training groups built from text, as the rollout stage builds them: the target
tokenised without special tokens and ended with EOS, old log-probs unused (zeros)."""

from __future__ import annotations

from typing import Any

from workers.training.grpo import TrainGroup


def tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def target(tokenizer: Any, text: str) -> list[int]:
    return [*tokens(tokenizer, text), int(tokenizer.eos_token_id)]


def sft_group(tokenizer: Any, prompt: list[int], text: str) -> TrainGroup:
    ids = target(tokenizer, text)
    return TrainGroup(prompt, [ids], [[0.0] * len(ids)], [1.0], objective="sft")


def dpo_group(tokenizer: Any, prompt: list[int], chosen: str, rejected: str) -> TrainGroup:
    c, r = target(tokenizer, chosen), target(tokenizer, rejected)
    return TrainGroup(prompt, [c, r], [[0.0] * len(c), [0.0] * len(r)], [1.0, 0.0],
                      objective="dpo")
