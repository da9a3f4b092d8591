"""The gateway's request path, without HTTP: authenticate, resolve, place, answer, log.

Per warm request: the key's lookup (cached for `key_cache_s`); one Redis round trip that
resolves the model (`CatalogIndex.lookup_in`) and fetches the residency states of the serve name
it resolved to last time (`Router.states_in`; a fresh promotion costs one more); then the
engine call, and one pipelined write of the answer (for feedback). Resolution happens per
request, so a request that starts after a promotion or a rollback gets the new revision, while
requests already routed finish on the old one (an engine's unload waits for its in-flight
requests). A request whose adapter the engine turns out not to have (restart, eviction behind
the controller's back) is reported to the controller and placed again once; it is never
answered by the base model in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.security import aiokafka_config
from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import AnswerServed
from workers.catalog.index import CatalogIndex
from workers.catalog.online import observe_feedback
from workers.catalog.writer import Catalog
from workers.serving import adapter_metrics as am
from workers.serving.assignment import live_engines
from workers.serving.client import SGLangError
from workers.serving.gateway.answers import (
    Answer,
    AnswerStore,
    FeedbackError,
    feedback_event,
    new_answer_id,
    parse_feedback,
    prompt_text,
)
from workers.serving.gateway.apikeys import ApiKey, ApiKeys, digest
from workers.serving.gateway.outcome import Outcome, observe_answer, observe_chunk
from workers.serving.gateway.resolve import ModelNotFound, Target, check, parse_model
from workers.serving.router import (
    AdapterLoadFailed,
    ColdLoadTimeout,
    NoEngineError,
    Route,
    Router,
)

log = logging.getLogger(__name__)
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
UNREACHABLE = (aiohttp.ClientConnectionError, OSError, TimeoutError)


class GatewayStartError(RuntimeError):
    """The gateway cannot start (Redis or Kafka does not answer): one message, no traceback."""


class GatewayError(Exception):
    """An answer in OpenAI's error format: status, message, type, code, Retry-After."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.retry_after = param, retry_after


@dataclass
class Call:
    """One request in flight: what it asked for, where it went, how it went."""

    kind: str
    body: dict[str, Any]
    key: ApiKey
    target: Target
    route: Route
    answer_id: str
    started: float
    cold_wait_s: float = 0.0
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def metric_name(self) -> str | None:
        return self.target.label if self.target.policy_id else None


class Gateway:
    def __init__(self, settings: Settings, client: redis.Redis | None = None, *,
                 key_cache_s: float = 2.0, retry_failed_s: float = 30.0) -> None:
        self.settings = settings
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.index = CatalogIndex(settings, self.r)
        self.router = Router(settings, self.r, cold_timeout_s=settings.gateway_cold_timeout_s,
                             engines_ttl_s=0.5, touch_interval_s=1.0)
        self.keys = ApiKeys(settings, self.r)
        self.answers = AnswerStore(settings, self.r, settings.gateway_answer_ttl_s)
        self.base_ids: dict[str, str] = {}
        """Engine URL -> its served model id (what `model` names the base model as there)."""
        self.metrics = am.AdapterMetrics("gateway")
        self.key_cache_s, self.retry_failed_s = key_cache_s, retry_failed_s
        self._key_cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._catalog: Catalog | None = None
        self._guesses: dict[str, str | None] = {}

    async def start(self) -> None:
        """Connect, or fail with one clear GatewayStartError when Redis or Kafka is not there
        (a misconfigured gateway must not come up and answer every request with a 500)."""
        try:
            await asyncio.to_thread(self.r.ping)
        except redis.RedisError as exc:
            raise GatewayStartError(f"Redis (LORASTREAM_REDIS_URL) does not answer: {exc}"
                                    ) from exc
        producer = AIOKafkaProducer(**aiokafka_config(self.settings), acks="all", linger_ms=5)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise GatewayStartError(f"Kafka at {self.settings.bootstrap_servers} "
                                    f"(LORASTREAM_BOOTSTRAP_SERVERS) does not answer: {exc}"
                                    ) from exc
        self._producer = producer
        await self.learn_base_ids()

    async def learn_base_ids(self) -> None:
        """Ask live engines for their served model id (the name the base model answers to);
        best effort: an engine that is not up yet is asked on its first request."""
        for url in live_engines(self.settings, self.r).values():
            with contextlib.suppress(SGLangError, OSError, aiohttp.ClientError, TimeoutError):
                await self._base_id(url)

    async def _base_id(self, url: str) -> str:
        if url not in self.base_ids:
            self.base_ids[url] = await self.router.client(url).served_model()
        return self.base_ids[url]

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self.router.close()
        if self._catalog is not None:
            self._catalog.close()

    # -- access ------------------------------------------------------------------------------
    def authenticate(self, header: str | None) -> ApiKey:
        secret = (header or "").removeprefix("Bearer ").strip()
        fingerprint, now = digest(secret), time.monotonic()
        cached = self._key_cache.get(fingerprint)
        if cached is not None and now - cached[0] < self.key_cache_s:
            key = cached[1]
        else:
            key = self.keys.check(secret) if secret else None
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[fingerprint] = (now, key)
        if key is None:
            raise GatewayError(401, "Incorrect API key provided: send a valid key as "
                               "`Authorization: Bearer <key>` (`lorastream keys create`).",
                               code="invalid_api_key")
        return key

    async def models(self, key: ApiKey) -> dict[str, Any]:
        """The key's namespace's policies, each with the revision it serves."""
        if not self.base_ids:
            await self.learn_base_ids()
        policies = self.index.namespace_policies(key.namespace)
        serving = self.index.serving_names(policies)
        base = next(iter(self.base_ids.values()), "base")
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "lorastream",
                 "root": base, "parent": None}]
        data += [{"id": p, "object": "model", "created": 0, "owned_by": key.namespace,
                  "root": name or f"{p}@0", "parent": base}
                 for p, name in zip(policies, serving, strict=True)]
        return {"object": "list", "data": data}

    # -- answering ---------------------------------------------------------------------------
    def _target(self, body: dict[str, Any], key: ApiKey
                ) -> tuple[Target, dict[str, str | None] | None]:
        """Resolve the request's model and, in the same round trip, the residency states of
        the serve name it resolved to last time (right unless it was just promoted)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' must name a policy, policy@revision or the base "
                               "model", param="model")
        try:
            parsed = parse_model(model, set(self.base_ids.values()))
            if parsed is None:
                return Target(None, key.namespace, 0, None), None
            guess = self._guesses.get(model)
            pipe = self.r.pipeline(transaction=False)
            self.index.lookup_in(pipe, *parsed)
            engines = self.router.states_in(pipe, guess) if guess else []
            got = pipe.execute()
            target = check(model, self.index.parse_lookup(parsed[0], got[0]), key.namespace)
        except ModelNotFound as exc:
            self.metrics.failed_unresolved(404)
            raise GatewayError(404, str(exc), param="model", code="model_not_found") from exc
        if len(self._guesses) > 100_000:
            self._guesses.clear()
        self._guesses[model] = target.serve_name
        if not engines or target.serve_name != guess:
            return target, None
        return target, {e: v.decode() if v is not None else None
                        for e, v in zip(engines, got[1:], strict=True)}

    async def _place(self, kind: str, body: dict[str, Any], key: ApiKey) -> Call:
        target, states = self._target(body, key)
        started = time.perf_counter()
        try:
            route = await self.router.route_name(target.serve_name, states)
        except (ColdLoadTimeout, NoEngineError) as exc:
            am.COLD_WAITS.labels("timeout").inc()
            self.metrics.failed(target.label if target.policy_id else None, 503)
            raise GatewayError(503, f"{target.label} is loading: {exc}", type_="server_error",
                               code="adapter_loading", retry_after=2.0) from exc
        except AdapterLoadFailed as exc:
            am.COLD_WAITS.labels("failed").inc()
            self.metrics.failed(target.label if target.policy_id else None, 503)
            raise GatewayError(503, str(exc), type_="server_error", code="adapter_unavailable",
                               retry_after=self.retry_failed_s) from exc
        call = Call(kind, body, key, target, route, new_answer_id(kind), started)
        if route.cold:
            call.cold_wait_s = time.perf_counter() - started
            am.COLD_WAITS.labels("loaded").inc()
            am.COLD_WAIT_SECONDS.observe(call.cold_wait_s)
        return call

    async def _engine_body(self, call: Call) -> dict[str, Any]:
        # Only the gateway names adapters: a client's `lora_path` could bypass namespaces.
        body = {k: v for k, v in call.body.items()
                if "lora" not in k and k not in ("stream", "stream_options")}
        base, name = await self._base_id(call.route.url), call.target.serve_name
        body["model"] = f"{base}:{name}" if name else base  # SGLang's way to name an adapter
        return body

    async def answer(self, kind: str, body: dict[str, Any], key: ApiKey
                     ) -> tuple[Call, dict[str, Any]]:
        """A non-streamed answer, in OpenAI's shape, with the gateway's id and revision."""
        for attempt in (0, 1):
            call = await self._place(kind, body, key)
            try:
                out = await self.router.client(call.route.url).openai(
                    PATHS[kind], await self._engine_body(call))
            except SGLangError as exc:
                if not self._lost(call, exc, attempt):
                    raise self._upstream_error(call, exc) from exc
                continue
            except UNREACHABLE as exc:
                self._unreachable(call, exc, attempt)
                continue
            finally:
                self.router.release(call.route)
            call.outcome = observe_answer(out)
            await self.finish(call)
            return call, {**out, "id": call.answer_id, "model": call.target.label}
        raise AssertionError("unreachable")

    async def open_stream(self, kind: str, body: dict[str, Any], key: ApiKey
                          ) -> tuple[Call, AsyncGenerator[dict[str, Any], None]]:
        """Start a streamed answer; its first chunk has arrived (or failed) when this returns,
        so nothing has been sent to the client before an error is known."""
        for attempt in (0, 1):
            call = await self._place(kind, body, key)
            chunks = self.router.client(call.route.url).openai_stream(
                PATHS[kind], await self._engine_body(call))
            try:
                first = await anext(chunks)
            except (SGLangError, *UNREACHABLE) as exc:
                self.router.release(call.route)
                await chunks.aclose()
                if not isinstance(exc, SGLangError):
                    self._unreachable(call, exc, attempt)
                elif not self._lost(call, exc, attempt):
                    raise self._upstream_error(call, exc) from exc
                continue
            return call, self._relay(call, first, chunks)
        raise AssertionError("unreachable")

    async def _relay(self, call: Call, first: dict[str, Any],
                     chunks: AsyncGenerator[dict[str, Any], None]
                     ) -> AsyncGenerator[dict[str, Any], None]:
        try:
            chunk: dict[str, Any] | None = first
            while chunk is not None:
                observe_chunk(call.outcome, chunk)
                yield {**chunk, "id": call.answer_id, "model": call.target.label}
                chunk = await anext(chunks, None)
        finally:
            self.router.release(call.route)
            await chunks.aclose()  # the engine's response, also when the client went away
        await self.finish(call)

    def _lost(self, call: Call, exc: SGLangError, attempt: int) -> bool:
        """The engine does not have the adapter: tell its controller; retry once."""
        if call.target.serve_name is None or "never been loaded" not in exc.message:
            return False
        self.router.report_lost(call.route)
        if attempt == 0:
            return True
        raise GatewayError(503, f"{call.target.label} is being reloaded on "
                           f"{call.route.engine_id}", type_="server_error",
                           code="adapter_loading", retry_after=1.0)

    def _unreachable(self, call: Call, exc: BaseException, attempt: int) -> None:
        """The engine did not answer (it died after its controller last reported): place the
        request again once, with a fresh view of the live engines; then 503."""
        log.warning("engine %s unreachable for %s: %r", call.route.engine_id, call.answer_id,
                    exc)
        self.router.forget_engines()
        if attempt == 1:
            self.metrics.failed(call.metric_name, 503)
            raise GatewayError(503, f"engine {call.route.engine_id} is unreachable",
                               type_="server_error", code="engine_unreachable",
                               retry_after=1.0) from exc

    def _upstream_error(self, call: Call, exc: SGLangError) -> GatewayError:
        self.metrics.failed(call.metric_name, exc.status)
        status = exc.status if 400 <= exc.status < 500 else 502
        return GatewayError(status, exc.message, type_="invalid_request_error" if status < 500
                            else "server_error")

    async def finish(self, call: Call) -> None:
        """Keep the answer for feedback, count it, and log a sample of answers to `served`."""
        done = time.perf_counter()
        o = call.outcome
        ttft = (o.first_token_at or done) - call.started
        self.answers.put(Answer(call.answer_id, call.target.policy_id, call.target.namespace,
                                call.target.revision, prompt_text(call.body, call.kind), o.text))
        self.metrics.answered(call.metric_name, prompt_tokens=o.prompt_tokens,
                              completion_tokens=o.completion_tokens,
                              latency_s=done - call.started, ttft_s=ttft)
        if (call.target.policy_id and self._producer is not None
                and random.random() < self.settings.gateway_served_sample):
            event = AnswerServed(
                policy_id=call.target.policy_id, answer_id=call.answer_id,
                namespace=call.target.namespace, revision=call.target.revision,
                engine=call.route.engine_id, route=call.kind,  # type: ignore[arg-type]
                stream=bool(call.body.get("stream")), prompt_tokens=o.prompt_tokens,
                completion_tokens=o.completion_tokens, latency_ms=(done - call.started) * 1e3,
                ttft_ms=ttft * 1e3, cold_wait_ms=call.cold_wait_s * 1e3,
                finish_reason=o.finish_reason)
            fut = await self._producer.send(self.settings.topic("served"), encode_event(event),
                                            key=event.policy_id.encode())
            fut.add_done_callback(_log_failed_send)

    # -- feedback ----------------------------------------------------------------------------
    async def feedback(self, body: Any, key: ApiKey) -> dict[str, Any]:
        """Turn feedback on an answer into an interaction log for its policy (acked by Kafka
        before this returns), then let production feedback judge the serving revision."""
        try:
            answer_id, score, correction = parse_feedback(body)
            answer = self.answers.get(answer_id)
            if answer is None or answer.namespace != key.namespace:
                raise FeedbackError(404, f"no answer {answer_id!r} (unknown or expired)")
            event = feedback_event(answer, score, correction)
            fingerprint = orjson.dumps([score, correction])
            if not self.answers.claim_feedback(answer_id, fingerprint):
                raise FeedbackError(409, f"answer {answer_id!r} already has other feedback")
        except FeedbackError as exc:
            raise GatewayError(exc.status, str(exc)) from exc
        assert self._producer is not None, "start() the gateway first"
        await self._producer.send_and_wait(self.settings.topic("interactions"),
                                           encode_event(event), key=event.policy_id.encode())
        assert answer.policy_id is not None
        rolled = await asyncio.to_thread(
            observe_feedback, self.settings, self.r, self.index, self._writer,
            answer.policy_id, answer.revision, score)
        return {"id": answer_id, "object": "feedback", "event_id": event.event_id,
                "policy": answer.policy_id, "revision": answer.revision, "task": event.task,
                "rolled_back_to": rolled.to_revision if rolled is not None else None}

    def _writer(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.settings, self.r, self.index)
        return self._catalog


def _log_failed_send(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("logging an answer to `served` failed: %s", fut.exception())
