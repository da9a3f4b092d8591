"""The gateway's HTTP app (aiohttp): OpenAI's routes plus feedback.

`POST /v1/chat/completions`, `POST /v1/completions` (`stream: true` answers server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`, `POST /v1/feedback`
`{"id", "score" in [-1, 1], "correction"?}`; `GET /health` is open, everything else needs an API
key of the namespace (`Authorization: Bearer lsk-…`). Errors are OpenAI's
`{"error": {"message", "type", "param", "code"}}`; 503s carry `Retry-After`. Every answer
reports the revision that gave it as its `model` (`alice@3`, as OpenAI reports a dated
snapshot for an alias) and in the `x-lorastream-revision` header.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from workers.serving.client import SGLangError
from workers.serving.gateway.apikeys import ApiKey
from workers.serving.gateway.service import Call, Gateway, GatewayError

log = logging.getLogger(__name__)
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
KEY: web.RequestKey[ApiKey] = web.RequestKey("api_key", ApiKey)
OPEN_PATHS = frozenset({"/health"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def error_response(exc: GatewayError) -> web.Response:
    headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after else None
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                      "code": exc.code}}
    return web.json_response(body, status=exc.status, headers=headers)


@web.middleware
async def errors_and_keys(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but /health needs a namespace's key; GatewayError becomes OpenAI's format."""
    try:
        if request.path not in OPEN_PATHS:
            request[KEY] = request.app[GATEWAY].authenticate(request.headers.get("Authorization"))
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object")
    return body


def _headers(call: Call) -> dict[str, str]:
    return {"x-lorastream-revision": str(call.target.revision),
            "x-lorastream-engine": call.route.engine_id,
            "x-lorastream-cold-wait-ms": f"{call.cold_wait_s * 1e3:.1f}"}


async def handle_completion(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    kind = "chat" if request.path.endswith("chat/completions") else "completion"
    body = await _body(request)
    if body.get("stream"):
        return await _stream(request, gateway, kind, body)
    call, out = await gateway.answer(kind, body, request[KEY])
    return web.json_response(out, headers=_headers(call), dumps=_dumps)


async def _stream(request: web.Request, gateway: Gateway, kind: str,
                  body: dict[str, Any]) -> web.StreamResponse:
    call, chunks = await gateway.open_stream(kind, body, request[KEY])
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", **_headers(call)})
    await resp.prepare(request)
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    try:
        try:
            async for chunk in chunks:
                if chunk.get("usage") and not chunk.get("choices"):
                    if not usage:
                        continue
                elif not usage:
                    chunk.pop("usage", None)
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        except (SGLangError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The headers are out: the error goes in the stream, as OpenAI does.
            log.warning("stream of %s failed: %s", call.answer_id, exc)
            err = {"error": {"message": str(exc), "type": "server_error", "param": None,
                             "code": None}}
            await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    finally:  # also when the client went away: the route is released, nothing is recorded
        await chunks.aclose()
    return resp


async def handle_models(request: web.Request) -> web.Response:
    return web.json_response(await request.app[GATEWAY].models(request[KEY]))


async def handle_feedback(request: web.Request) -> web.Response:
    return web.json_response(await request.app[GATEWAY].feedback(await _body(request),
                                                                 request[KEY]))


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(status=200)


def build_app(gateway: Gateway) -> web.Application:
    """The app; its startup/cleanup start and close the gateway (Kafka producer, sessions)."""
    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[errors_and_keys])
    app[GATEWAY] = gateway

    async def lifecycle(_: web.Application) -> Any:
        await gateway.start()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", handle_completion)
    app.router.add_post("/v1/completions", handle_completion)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/feedback", handle_feedback)
    app.router.add_get("/health", handle_health)
    return app
