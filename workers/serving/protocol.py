"""SGLang request parsing and response formatting for the CPU engine (no HTTP here).

`/generate` takes GenerateReqInput: `text` or `input_ids` (one prompt or a batch),
`sampling_params` (one dict or one per prompt), `lora_path` (one adapter name, or one per prompt
with null for the base model), `return_logprob`; it answers one object for a single prompt and a
list for a batch, with `meta_info.output_token_logprobs` as [logprob, token_id, text|null].
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from workers.serving.sampler import RowRequest, RowResult

if TYPE_CHECKING:
    from workers.serving.cpu_engine import CpuEngine

DEFAULT_MAX_NEW_TOKENS = 128
_NEUTRAL = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "frequency_penalty": 0.0, "presence_penalty": 0.0}
"""Processing SGLang offers that this engine does not: log-probs must be of the raw logits."""
_ACCEPTED = {"max_new_tokens", "temperature", "sampling_seed", "stop_token_ids", "n",
             "skip_special_tokens", "stop", "ignore_eos", *_NEUTRAL}


class BadRequest(ValueError):
    """A request this engine refuses with 400."""


def row_from_params(input_ids: list[int], params: dict[str, Any]) -> RowRequest:
    """SGLang sampling_params -> one row; unsupported processing is refused, never ignored."""
    unknown = set(params) - _ACCEPTED
    if unknown:
        raise BadRequest(f"unsupported sampling_params: {sorted(unknown)}")
    for key, neutral in _NEUTRAL.items():
        if key in params and params[key] is not None and float(params[key]) != neutral:
            raise BadRequest(f"sampling_params.{key}={params[key]} is not supported by the "
                             "CPU engine (log-probs are of the raw logits)")
    if int(params.get("n") or 1) != 1:
        raise BadRequest("n > 1 is not supported: send the prompt once per sample")
    if params.get("stop"):
        raise BadRequest("stop strings are not supported by the CPU engine (use stop_token_ids)")
    max_new = int(params.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    temperature = float(params.get("temperature", 1.0) if params.get("temperature")
                        is not None else 1.0)
    if max_new < 1 or temperature < 0.0:
        raise BadRequest("need max_new_tokens >= 1 and temperature >= 0")
    seed = params.get("sampling_seed")
    return RowRequest(list(input_ids), None, max_new_tokens=max_new, temperature=temperature,
                      seed=int(seed) if seed is not None else None,
                      stop_token_ids=frozenset(int(t) for t in params.get("stop_token_ids") or ()),
                      ignore_eos=bool(params.get("ignore_eos")))


def _as_list(value: Any, count: int, what: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{what} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def parse_generate(engine: CpuEngine, body: dict[str, Any]
                   ) -> tuple[list[RowRequest], list[str | None], bool]:
    """GenerateReqInput -> rows, adapter per row, and whether the request was a batch."""
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by the CPU engine")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("Either text or input_ids should be provided.")
    if text is not None:
        batch = isinstance(text, list)
        prompts = [engine.sampler.encode(t) for t in (text if batch else [text])]
    else:
        if not isinstance(ids, list):
            raise BadRequest("input_ids must be a list of token ids or a list of such lists")
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = ids if batch else [ids]
    if not prompts or any(not p for p in prompts):
        raise BadRequest("empty prompt")
    params = _as_list(body.get("sampling_params") or {}, len(prompts), "sampling_params")
    adapters = _as_list(body.get("lora_path"), len(prompts), "lora_path")
    rows = [row_from_params(p, sp or {}) for p, sp in zip(prompts, params, strict=True)]
    return rows, adapters, batch


def format_output(engine: CpuEngine, row: RowRequest, res: RowResult, *, started: float,
                  logprobs: bool, text_in_logprobs: bool) -> dict[str, Any]:
    """One /generate result: text, output_ids and meta_info as SGLang's TokenizerManager."""
    if res.matched_stop is not None:
        finish: dict[str, Any] = {"type": "stop", "matched": res.matched_stop}
    else:
        finish = {"type": "length", "length": row.max_new_tokens}
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(row.input_ids),
        "weight_version": "default", "completion_tokens": len(res.output_ids),
        "cached_tokens": 0, "e2e_latency": time.perf_counter() - started,
    }
    if logprobs:
        texts = ([engine.sampler.decode([t]) for t in res.output_ids] if text_in_logprobs
                 else [None] * len(res.output_ids))
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [
            [lp, tok, txt] for lp, tok, txt in zip(res.logprobs, res.output_ids, texts,
                                                   strict=True)]
    return {"text": engine.sampler.decode(res.output_ids), "output_ids": res.output_ids,
            "meta_info": meta}
