"""OpenAI-compatible `/v1/chat/completions` and `/v1/completions` for the CPU engine.

As in SGLang's OpenAIServingBase: `model="<base>:<adapter>"` is split on the first colon and
the adapter named there wins over a `lora_path` passed in the body (kept for compatibility);
`model` without a colon means the base model.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from workers.serving.protocol import BadRequest, row_from_params

if TYPE_CHECKING:
    from workers.serving.cpu_engine import CpuEngine
    from workers.serving.sampler import RowRequest, RowResult


def parse_model(model: str | None) -> tuple[str | None, str | None]:
    """'base:adapter' -> ('base', 'adapter'); 'base' -> ('base', None)."""
    if not model:
        return None, None
    base, sep, adapter = model.partition(":")
    return base, (adapter or None) if sep else None


def resolve_adapter(body: dict[str, Any]) -> str | None:
    _, adapter = parse_model(body.get("model"))
    explicit = body.get("lora_path")
    return adapter or (explicit if isinstance(explicit, str) and explicit else None)


def openai_error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequestError",
                              "param": None, "code": status}, status=status)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    params = {"max_new_tokens": max_tokens, "temperature": body.get("temperature"),
              "sampling_seed": body.get("seed"), "n": body.get("n"),
              "top_p": body.get("top_p"), "stop": body.get("stop")}
    return {k: v for k, v in params.items() if v is not None}


def _chat_prompt(engine: CpuEngine, messages: list[dict[str, Any]]) -> list[int]:
    tok = engine.sampler.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]  # type: ignore[arg-type, union-attr]
    text = "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages)
    return engine.sampler.encode(text + "assistant:")


def _finish(res: RowResult) -> str:
    return "stop" if res.matched_stop is not None else "length"


def _usage(rows: list[RowRequest], results: list[RowResult]) -> dict[str, int]:
    prompt = sum(len(r.input_ids) for r in rows)
    completion = sum(len(r.output_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def chat_completions(engine: CpuEngine, body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    row = row_from_params(_chat_prompt(engine, messages), _sampling(body))
    (res,) = await engine.generate([row], [resolve_adapter(body)])
    logprobs = None
    if body.get("logprobs"):
        content = []
        for tok, lp in zip(res.output_ids, res.logprobs, strict=True):
            text = engine.sampler.decode([tok])
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                            "top_logprobs": []})
        logprobs = {"content": content}
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": _finish(res),
              "matched_stop": res.matched_stop,
              "message": {"role": "assistant", "content": engine.sampler.decode(res.output_ids),
                          "reasoning_content": None, "tool_calls": None}}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model") or engine.model_name,
            "choices": [choice], "usage": _usage([row], [res])}


async def completions(engine: CpuEngine, body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise BadRequest("prompt must be a non-empty string or list of strings")
    params = _sampling(body)
    rows = [row_from_params(engine.sampler.encode(str(p)), params) for p in prompts]
    adapter = resolve_adapter(body)
    results = await engine.generate(rows, [adapter] * len(rows))
    choices = []
    for i, res in enumerate(results):
        logprobs = None
        if body.get("logprobs") is not None:
            logprobs = {"tokens": [engine.sampler.decode([t]) for t in res.output_ids],
                        "token_logprobs": res.logprobs, "top_logprobs": [], "text_offset": []}
        choices.append({"index": i, "text": engine.sampler.decode(res.output_ids),
                        "logprobs": logprobs, "finish_reason": _finish(res),
                        "matched_stop": res.matched_stop})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": body.get("model") or engine.model_name,
            "choices": choices, "usage": _usage(rows, results)}
