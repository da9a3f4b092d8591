"""The CPU engine's HTTP app: SGLang's native and OpenAI-compatible endpoints over aiohttp.

Shapes follow SGLang's source (`srt/entrypoints/http_server.py`,
`srt/entrypoints/openai/serving_base.py`): load/unload answer LoRAUpdateOutput with 200 on
success and 400 otherwise; `/generate` answers one object for a single prompt and a list for a
batch, and a bad request gets 400 `{"error": {"message"}}`; the OpenAI routes name the adapter
as `model="<base>:<adapter>"` (split on the first colon) and answer errors as
`{"object": "error", "message", "type", "param", "code"}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from workers.serving.adapter_metrics import AdapterMetrics
from workers.serving.cpu_engine import CpuEngine
from workers.serving.openai_api import chat_completions, completions, openai_error, resolve_adapter
from workers.serving.protocol import BadRequest, format_output, parse_generate
from workers.serving.registry import RegistryError

log = logging.getLogger(__name__)
ENGINE_KEY: web.AppKey[CpuEngine] = web.AppKey("engine", CpuEngine)
ADMIN_PATHS = frozenset({"/load_lora_adapter", "/unload_lora_adapter"})
"""What changes the engine's adapters: only holders of the admin token may call these."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS = AdapterMetrics("engine")
"""Per-adapter requests, errors, tokens and latency of every engine in this process."""


def admin_auth(token: str) -> Any:
    """Middleware: `Authorization: Bearer <token>` on the admin routes, as SGLang does with
    `--admin-api-key`; compared in constant time. Generation stays open."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ADMIN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check


def generate_error(message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=400)


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def handle_generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    started = time.perf_counter()
    adapters: list[str | None] = []
    try:
        body = await _json(request)
        rows, adapters, batch = parse_generate(engine, body)
        results = await engine.generate(rows, adapters)
    except (BadRequest, RegistryError, TypeError, ValueError) as exc:
        for adapter in adapters:
            METRICS.failed(adapter, 400)
        if not adapters:
            METRICS.failed_unresolved(400)
        return generate_error(str(exc))
    elapsed = time.perf_counter() - started
    for row, adapter, res in zip(rows, adapters, results, strict=True):
        METRICS.answered(adapter, prompt_tokens=len(row.input_ids),
                         completion_tokens=len(res.output_ids), latency_s=elapsed)
    flags = {"logprobs": bool(body.get("return_logprob")),
             "text_in_logprobs": bool(body.get("return_text_in_logprobs"))}
    outs = [format_output(engine, r, res, started=started, **flags)
            for r, res in zip(rows, results, strict=True)]
    return web.json_response(outs if batch else outs[0])


async def _lora_update(request: web.Request, load: bool) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await _json(request)
        name = body["lora_name"]
        if load:
            out = await engine.load_lora_adapter(name, body["lora_path"],
                                                 bool(body.get("pinned", False)))
        else:
            out = await engine.unload_lora_adapter(name)
    except (BadRequest, KeyError, TypeError) as exc:
        out = {"rid": None, "http_worker_ipc": None, "success": False,
               "error_message": f"bad request: {exc}", "loaded_adapters": None}
    return web.json_response(out, status=200 if out["success"] else 400)


async def handle_load(request: web.Request) -> web.Response:
    return await _lora_update(request, load=True)


async def handle_unload(request: web.Request) -> web.Response:
    return await _lora_update(request, load=False)


async def handle_openai(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    handler = chat_completions if request.path.endswith("chat/completions") else completions
    started = time.perf_counter()
    body: dict[str, Any] = {}
    try:
        body = await _json(request)
        out = await handler(engine, body)
    except (BadRequest, RegistryError, TypeError, ValueError) as exc:
        if body:
            METRICS.failed(resolve_adapter(body), 400)
        else:
            METRICS.failed_unresolved(400)
        return openai_error(str(exc))
    usage = out.get("usage") or {}
    METRICS.answered(resolve_adapter(body), prompt_tokens=int(usage.get("prompt_tokens", 0)),
                     completion_tokens=int(usage.get("completion_tokens", 0)),
                     latency_s=time.perf_counter() - started)
    return web.json_response(out)


async def handle_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    created = int(time.time())
    base = {"id": engine.model_name, "object": "model", "created": created,
            "owned_by": "sglang", "root": engine.model_name, "parent": None}
    adapters = [{"id": name, "object": "model", "created": created, "owned_by": "sglang",
                 "root": path, "parent": engine.model_name}
                for name, path in engine.registry.loaded_adapters().items()]
    return web.json_response({"object": "list", "data": [base, *adapters]})


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def handle_model_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response({"model_path": str(engine.config.base_path),
                              "tokenizer_path": str(engine.config.base_path),
                              "is_generation": True})


async def handle_metrics(request: web.Request) -> web.Response:
    """SGLang's pool gauges (no per-adapter labels there either), Prometheus text format."""
    engine = request.app[ENGINE_KEY]
    used = len(engine.registry.loaded_adapters())
    total = engine.config.max_loaded_loras
    lines = [f"sglang:lora_pool_slots_used {used}", f"sglang:lora_pool_slots_total {total}",
             f"sglang:lora_pool_utilization {used / total:.6f}",
             f"lorastream:engine_batches_total {engine.batches}"]
    # The residency controller runs in this process too: its gauges (adapters per state, hot
    # set, cold loads) come from the process-wide Prometheus registry.
    text = "\n".join(lines) + "\n" + generate_latest().decode()
    return web.Response(text=text, content_type="text/plain")


def build_app(engine: CpuEngine, admin_token: str | None = None) -> web.Application:
    """The app; its startup/cleanup start and stop the engine's batcher. With `admin_token`,
    loading and unloading adapters requires it (bearer)."""
    middlewares = [admin_auth(admin_token)] if admin_token else []
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[ENGINE_KEY] = engine

    async def lifecycle(_: web.Application) -> Any:
        await engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/generate", handle_generate)
    app.router.add_put("/generate", handle_generate)
    app.router.add_post("/load_lora_adapter", handle_load)
    app.router.add_post("/unload_lora_adapter", handle_unload)
    app.router.add_post("/v1/chat/completions", handle_openai)
    app.router.add_post("/v1/completions", handle_openai)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/get_model_info", handle_model_info)
    app.router.add_get("/metrics", handle_metrics)
    return app


class ServerThread:
    """The engine's HTTP server on its own event loop thread (tests, benchmarks, embedding).

    `port=0` binds a free port; `url` is known once `start()` returns.
    """

    def __init__(self, engine: CpuEngine, host: str = "127.0.0.1", port: int = 0,
                 admin_token: str | None = None) -> None:
        self.engine, self.host, self.port = engine, host, port
        self.admin_token = admin_token
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cpu-engine-http", daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"engine server did not start: {self._error!r}")
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(build_app(self.engine, self.admin_token), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://{self.host}:{port}"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
