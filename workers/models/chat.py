"""Prompts as the model expects them: its chat template, and every id that ends a turn.

Rollout, training and evaluation must see the same token ids for one interaction, so the text
is rendered to ids here, once, by one function: with the tokenizer's chat template when it has
one (a plain `prompt` becomes one user message; `messages` are OpenAI-format turns), else the
plain encoding of `prompt`. The trainer then trains on exactly the ids that were sampled.

A model may end a turn with more than one id: SmolLM2-135M as converted from its GGUF has the
tokenizer's EOS `<|im_start|>` (1) while its `generation_config` ends turns with `<|im_end|>`
(2). `end_ids` is the union of what the tokenizer, the model config and the generation config
declare; samplers stop on any of them (SGLang does the same, unless `ignore_eos`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def end_ids(tokenizer: PreTrainedTokenizerBase, model: Any = None) -> frozenset[int]:
    """Every end-of-turn id the tokenizer, the model config and its generation config declare."""
    ids = _ids(tokenizer.eos_token_id)
    if model is not None:
        ids |= _ids(getattr(getattr(model, "config", None), "eos_token_id", None))
        ids |= _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return frozenset(ids)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | None = None,
                  messages: Sequence[dict[str, str]] | None = None) -> list[int]:
    """The prompt ids of an interaction: the chat template applied to `messages` (or to
    `prompt` as one user turn) with the generation prompt appended, or, for a tokenizer without
    a template, the encoding of `prompt`. `messages` without a template is an error: there is
    no faithful way to flatten turns the model was not trained on."""
    if has_chat_template(tokenizer):
        turns = list(messages) if messages else [{"role": "user", "content": prompt or ""}]
        ids: Any = tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return [int(i) for i in ids]
    if messages:
        raise ValueError("this base model's tokenizer has no chat template: send `prompt`, "
                         "not `messages`")
    if prompt is None:
        raise ValueError("an interaction needs a prompt or messages")
    return [int(i) for i in tokenizer(prompt)["input_ids"]]
