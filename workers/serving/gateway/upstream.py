"""Calling an engine's OpenAI routes for the gateway: the same code for SGLang and the CPU engine.

The adapter is named as SGLang's OpenAI routes want it, `model="<base>:<serve name>"` (the base
part is the engine's own served model id, read once from its `/v1/models`), or the bare base id.
A streamed request asks the engine for server-sent events with usage; an engine that answers a
plain JSON completion instead (the CPU engine does not stream) is turned into OpenAI's chunks
here, so clients always get the shape they asked for.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


class UpstreamError(RuntimeError):
    """The engine refused or failed: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


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


def error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(body.get("message") or err or body)
    return str(body)


class Upstream:
    """One pooled aiohttp session to every engine; engines' base ids cached by URL."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.base_ids: dict[str, str] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def base_id(self, url: str) -> str:
        """The engine's served model id (the entry of `/v1/models` without a parent)."""
        if url not in self.base_ids:
            async with self.session.get(f"{url}/v1/models") as resp:
                body = await resp.json(content_type=None)
            if resp.status != 200:
                raise UpstreamError(resp.status, error_message(body))
            base = next((m for m in body.get("data", []) if m.get("parent") is None),
                        (body.get("data") or [{"id": "default"}])[0])
            self.base_ids[url] = str(base["id"])
        return self.base_ids[url]

    async def model(self, url: str, serve_name: str | None) -> str:
        base = await self.base_id(url)
        return f"{base}:{serve_name}" if serve_name else base

    async def complete(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed answer (JSON), or UpstreamError."""
        async with self.session.post(f"{url}{path}", json=body) as resp:
            raw = await resp.read()
            status = resp.status
        try:
            out = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            out = raw.decode(errors="replace")
        if status != 200 or not isinstance(out, dict):
            raise UpstreamError(status, error_message(out))
        return out

    async def stream(self, url: str, path: str, body: dict[str, Any]
                     ) -> AsyncGenerator[dict[str, Any], None]:
        """The engine's answer as OpenAI chunk objects (without the final [DONE]). The first
        chunk is awaited before anything is yielded, so an engine's refusal raises here."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(f"{url}{path}", json=payload) as resp:
            if resp.status != 200:
                raise UpstreamError(resp.status, error_message(
                    await resp.json(content_type=None)))
            if not resp.content_type.startswith("text/event-stream"):
                for chunk in as_chunks(await resp.json(content_type=None)):
                    yield chunk
                return
            async for line in resp.content:
                data = line.strip()
                if not data.startswith(b"data:"):
                    continue
                data = data[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = orjson.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise UpstreamError(502, error_message(chunk))
                yield chunk


def as_chunks(out: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole completion as OpenAI stream chunks: role, content, finish, usage."""
    chat = out.get("object") == "chat.completion"
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": out.get("id", ""), "object": kind, "created": out.get("created", 0),
            "model": out.get("model", "")}
    chunks = []
    for choice in out.get("choices", []):
        i = choice.get("index", 0)
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            chunks.append({**head, "choices": [{"index": i, "delta": {
                "role": "assistant", "content": ""}, "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": i, "delta": {"content": text},
                                                "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": i, "delta": {},
                                                "finish_reason": choice.get("finish_reason")}]})
        else:
            chunks.append({**head, "choices": [{"index": i, "text": choice.get("text", ""),
                                                "logprobs": None, "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                "finish_reason": choice.get("finish_reason")}]})
    chunks.append({**head, "choices": [], "usage": out.get("usage") or {}})
    return chunks


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
