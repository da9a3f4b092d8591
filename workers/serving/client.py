"""A client for SGLang's HTTP API (a real SGLang server or lorastream's CPU engine).

Speaks exactly what SGLang implements (`python/sglang/srt/entrypoints/http_server.py`,
`managers/io_struct.py`): `POST /load_lora_adapter`
`{lora_name, lora_path, pinned}` and `POST /unload_lora_adapter` `{lora_name}` answer
`{success, error_message, loaded_adapters}` with 200, or 400 on failure; `/generate` names the
adapter in `lora_path` (a name, not a path); the OpenAI routes use `model="<base>:<adapter>"`.

`SGLangClient` is synchronous (stdlib only) so pipeline stages can call it from any thread;
`AsyncSGLangClient` (aiohttp) serves the residency controller, the router and the gateway
(OpenAI routes, streamed as server-sent events; an engine that answers a streamed request with
one JSON completion, as the CPU engine does, is re-cut into OpenAI's chunks).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import orjson

Prompts = str | Sequence[str] | Sequence[Sequence[int]]
"""Text prompt(s), or token-id prompts (sent as `input_ids`: what was rendered is sampled)."""
AdapterArg = str | None | Sequence[str | None]


class SGLangError(RuntimeError):
    """The server refused a request (HTTP 400) or answered something unexpected."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


@dataclass(frozen=True)
class LoRAUpdate:
    """LoRAUpdateOutput: `loaded_adapters` is the server's whole registry after the call."""

    success: bool
    error_message: str
    loaded_adapters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """One `/generate` result with its per-token log-probs (return_logprob=True)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    matched_stop: int | None
    prompt_tokens: int
    meta_info: dict[str, Any]

    @property
    def finished(self) -> bool:
        """True when the model stopped by itself (EOS/stop token), not at max_new_tokens."""
        return self.finish_reason == "stop"


def generate_payload(prompts: Prompts, *, lora_path: AdapterArg = None,
                     sampling_params: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
                     return_logprob: bool = True) -> dict[str, Any]:
    """GenerateReqInput as JSON; a list of prompts is always sent as a batch."""
    body: dict[str, Any] = {"return_logprob": return_logprob}
    if isinstance(prompts, str):
        body["text"] = prompts
    elif prompts and not isinstance(prompts[0], str):
        body["input_ids"] = [[int(t) for t in p] for p in prompts]
    else:
        body["text"] = list(prompts)
    if sampling_params is not None:
        body["sampling_params"] = (sampling_params if isinstance(sampling_params, dict)
                                   else list(sampling_params))
    if lora_path is not None:
        body["lora_path"] = lora_path if isinstance(lora_path, str) else list(lora_path)
    return body


def parse_generation(obj: dict[str, Any]) -> Generation:
    meta = obj.get("meta_info") or {}
    finish = meta.get("finish_reason") or {}
    triples = meta.get("output_token_logprobs") or []
    ids = obj.get("output_ids")
    if ids is None:
        ids = [int(t[1]) for t in triples]
    return Generation(
        text=str(obj.get("text", "")),
        token_ids=[int(i) for i in ids],
        logprobs=[float(t[0]) for t in triples],
        finish_reason=str(finish.get("type", "")) if isinstance(finish, dict) else str(finish),
        matched_stop=finish.get("matched") if isinstance(finish, dict) else None,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        meta_info=meta,
    )


def parse_generate_response(status: int, body: Any) -> list[Generation]:
    if status != 200:
        raise SGLangError(status, _error_text(body), body)
    items = body if isinstance(body, list) else [body]
    return [parse_generation(item) for item in items]


def parse_update(status: int, body: Any) -> LoRAUpdate:
    """200 + success, or raise SGLangError carrying the server's error_message."""
    if not isinstance(body, dict) or "success" not in body:
        raise SGLangError(status, f"not a LoRAUpdateOutput: {body!r}", body)
    update = LoRAUpdate(bool(body["success"]), str(body.get("error_message") or ""),
                        dict(body.get("loaded_adapters") or {}))
    if status != 200 or not update.success:
        raise SGLangError(status, update.error_message or "LoRA update failed", body)
    return update


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if body.get("object") == "error":
            return str(body.get("message"))
        return str(err or body.get("error_message") or body)
    return str(body)


def openai_model(base_model: str, adapter: str | None) -> str:
    return f"{base_model}:{adapter}" if adapter else base_model


def sample_params(n_prompts: int, n: int, *, max_new_tokens: int, temperature: float,
                  seed: int | None, stop_token_ids: Sequence[int] = ()
                  ) -> list[dict[str, Any]]:
    """One sampling_params per replicated row; distinct derived seeds keep samples distinct.
    `stop_token_ids`: every end id the base declares (SGLang stops on them too)."""
    params = []
    for i in range(n_prompts * n):
        p: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        if stop_token_ids:
            p["stop_token_ids"] = sorted(stop_token_ids)
        if seed is not None:
            p["sampling_seed"] = (seed * 1_000_003 + i) % (2**62)
        params.append(p)
    return params


def auth_headers(api_key: str | None) -> dict[str, str]:
    """SGLang's API key (or admin key) as a bearer token; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SGLangClient:
    """Blocking client (urllib): thread-safe, no event loop needed."""

    def __init__(self, base_url: str, *, timeout: float = 120.0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **auth_headers(api_key)}

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def health(self) -> bool:
        try:
            return self._request("GET", "/health")[0] == 200
        except OSError:
            return False

    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False
                          ) -> LoRAUpdate:
        body = {"lora_name": lora_name, "lora_path": str(lora_path), "pinned": pinned}
        return parse_update(*self._request("POST", "/load_lora_adapter", body))

    def unload_lora_adapter(self, lora_name: str) -> LoRAUpdate:
        return parse_update(*self._request("POST", "/unload_lora_adapter",
                                           {"lora_name": lora_name}))

    def generate(self, prompts: Prompts, *, lora_path: AdapterArg = None,
                 sampling_params: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
                 return_logprob: bool = True) -> list[Generation]:
        body = generate_payload(prompts, lora_path=lora_path, sampling_params=sampling_params,
                                return_logprob=return_logprob)
        return parse_generate_response(*self._request("POST", "/generate", body))

    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], adapter: str | None, *,
               n: int, max_new_tokens: int, temperature: float = 1.0, seed: int | None = None,
               stop_token_ids: Sequence[int] = ()) -> list[list[Generation]]:
        """n samples per prompt with log-probs, in one batched /generate (rollout's shape)."""
        rows = [p for p in prompts for _ in range(n)]
        params = sample_params(len(prompts), n, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, stop_token_ids=stop_token_ids)
        out = self.generate(cast(Prompts, rows), lora_path=[adapter] * len(rows),
                            sampling_params=params)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def chat_completion(self, messages: list[dict[str, Any]], *, base_model: str,
                        adapter: str | None = None, **kwargs: Any) -> dict[str, Any]:
        body = {"model": openai_model(base_model, adapter), "messages": messages, **kwargs}
        status, out = self._request("POST", "/v1/chat/completions", body)
        if status != 200:
            raise SGLangError(status, _error_text(out), out)
        return dict(out)

    def models(self) -> list[dict[str, Any]]:
        status, out = self._request("GET", "/v1/models")
        if status != 200:
            raise SGLangError(status, _error_text(out), out)
        return list(out["data"])


class AsyncSGLangClient:
    """aiohttp client: one session per client; close() it (or use `async with`)."""

    def __init__(self, base_url: str, *, timeout: float = 120.0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = auth_headers(api_key)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncSGLangClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        async with self._session.request(method, self.base_url + path, json=body) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw.decode(errors="replace")

    async def health(self) -> bool:
        try:
            return (await self._request("GET", "/health"))[0] == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False
                                ) -> LoRAUpdate:
        body = {"lora_name": lora_name, "lora_path": str(lora_path), "pinned": pinned}
        return parse_update(*await self._request("POST", "/load_lora_adapter", body))

    async def unload_lora_adapter(self, lora_name: str) -> LoRAUpdate:
        return parse_update(*await self._request("POST", "/unload_lora_adapter",
                                                 {"lora_name": lora_name}))

    async def generate(self, prompts: Prompts, *, lora_path: AdapterArg = None,
                       sampling_params: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
                       return_logprob: bool = True) -> list[Generation]:
        body = generate_payload(prompts, lora_path=lora_path, sampling_params=sampling_params,
                                return_logprob=return_logprob)
        return parse_generate_response(*await self._request("POST", "/generate", body))

    async def models(self) -> list[dict[str, Any]]:
        status, out = await self._request("GET", "/v1/models")
        if status != 200:
            raise SGLangError(status, _error_text(out), out)
        return list(out["data"])

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def served_model(self) -> str:
        """The engine's served model id: the `/v1/models` entry without a parent."""
        data = await self.models()
        base = next((m for m in data if m.get("parent") is None), data[0] if data else None)
        return str(base["id"]) if base else "default"

    async def openai(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One non-streamed answer of an OpenAI route (`/v1/chat/completions`, ...)."""
        async with self._ensure_session().post(self.base_url + path, json=body) as resp:
            status, raw = resp.status, await resp.read()
        try:
            out = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            out = raw.decode(errors="replace")
        if status != 200 or not isinstance(out, dict):
            raise SGLangError(status, _error_text(out), out)
        return out

    async def openai_stream(self, path: str, body: dict[str, Any]
                            ) -> AsyncGenerator[dict[str, Any], None]:
        """An OpenAI route's answer as chunk objects (usage included, without `[DONE]`); an
        error before or inside the stream raises SGLangError."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with self._ensure_session().post(self.base_url + path, json=payload) as resp:
            if resp.status != 200:
                out = await resp.json(content_type=None)
                raise SGLangError(resp.status, _error_text(out), out)
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
                    raise SGLangError(502, _error_text(chunk), chunk)
                yield chunk


def as_chunks(out: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole OpenAI completion as the chunks streaming it would have sent: role, content,
    finish, usage."""
    chat = out.get("object") == "chat.completion"
    head = {"id": out.get("id", ""), "object": "chat.completion.chunk" if chat else
            "text_completion", "created": out.get("created", 0), "model": out.get("model", "")}
    chunks: list[dict[str, Any]] = []
    for choice in out.get("choices", []):
        i, finish = choice.get("index", 0), choice.get("finish_reason")
        if chat:
            text = (choice.get("message") or {}).get("content") or ""
            deltas = [{"role": "assistant", "content": ""}, {"content": text}, {}]
            chunks += [{**head, "choices": [{"index": i, "delta": d, "finish_reason":
                                             finish if not d else None}]} for d in deltas]
        else:
            chunks += [{**head, "choices": [{"index": i, "text": t, "logprobs": None,
                                             "finish_reason": f}]}
                       for t, f in ((choice.get("text", ""), None), ("", finish))]
    chunks.append({**head, "choices": [], "usage": out.get("usage") or {}})
    return chunks
