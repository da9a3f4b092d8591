"""What an engine's answer amounted to (text, finish, tokens, first-token time), streamed or
not; the engine calls themselves are `AsyncSGLangClient`'s (`workers/serving/client.py`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What an answer amounted to, streamed or not."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    chunks: int = 0
    usage: dict[str, int] = field(default_factory=dict)


def observe_chunk(outcome: Outcome, chunk: dict[str, Any]) -> None:
    """Accumulate a chunk into the answer's text, finish reason, usage and first-token time."""
    outcome.chunks += 1
    usage = chunk.get("usage")
    if usage:
        outcome.usage = usage
        outcome.prompt_tokens = int(usage.get("prompt_tokens", 0))
        outcome.completion_tokens = int(usage.get("completion_tokens", 0))
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        if text:
            outcome.text += text
            if outcome.first_token_at is None:
                outcome.first_token_at = time.perf_counter()
        if choice.get("finish_reason"):
            outcome.finish_reason = str(choice["finish_reason"])


def observe_answer(out: dict[str, Any]) -> Outcome:
    """The outcome of a non-streamed answer (first choice's text)."""
    usage = out.get("usage") or {}
    choices = out.get("choices") or [{}]
    first = choices[0]
    text = ((first.get("message") or {}).get("content") if "message" in first
            else first.get("text")) or ""
    return Outcome(text=text, finish_reason=str(first.get("finish_reason") or ""),
                   prompt_tokens=int(usage.get("prompt_tokens", 0)),
                   completion_tokens=int(usage.get("completion_tokens", 0)), usage=usage)
