"""Parts of the gateway without a broker: label cardinality, feedback parsing, chunking, model
names, and a start-up without Redis."""

from __future__ import annotations

import pytest

from workers.serving.adapter_metrics import OTHER, REQUESTS, AdapterMetrics, TopN, split_serve_name
from workers.serving.client import as_chunks
from workers.serving.gateway.answers import (
    Answer,
    FeedbackError,
    feedback_event,
    parse_feedback,
    prompt_text,
)
from workers.serving.gateway.outcome import Outcome, observe_chunk


def test_top_n_labels_only_the_busiest_policies() -> None:
    top = TopN(n=2, table=8)
    for _ in range(5):
        assert top.admit("a") == ("a", None)
    assert top.admit("b") == ("b", None)
    assert top.admit("c") == (OTHER, None)  # full: c must out-count the weakest (b, 1)
    assert top.admit("c") == ("c", "b")  # now c (2) beats b (1): b loses its label
    for i in range(100):  # a flood of one-off policies never gets a label
        assert top.admit(f"x{i}")[0] == OTHER
    assert top.labelled == {"a", "c"} and len(top.counts) <= 8


def test_adapter_metrics_stay_bounded_and_drop_evicted_series() -> None:
    metrics = AdapterMetrics("unit-test", top=3, revisions=2)
    for i in range(50):
        for _ in range(50 - i):  # u0 busiest
            metrics.answered(f"u{i}@1", prompt_tokens=1, completion_tokens=1, latency_s=0.01)
    for rev in (2, 3):
        metrics.answered(f"u0@{rev}", prompt_tokens=1, completion_tokens=1, latency_s=0.01)
    series = {s.labels["policy"] + "@" + s.labels["revision"]
              for m in REQUESTS.collect() for s in m.samples
              if s.labels.get("component") == "unit-test" and s.name.endswith("_total")}
    assert series <= {"u0@2", "u0@3", "u1@1", "u2@1", "other@other"}
    assert "u0@1" not in series  # only the newest 2 revisions of a policy keep series


def test_serve_names_split_into_labels() -> None:
    assert split_serve_name("alice@3") == ("alice", "3")
    assert split_serve_name(None) == ("base", "0")
    assert split_serve_name("lora0") == ("lora0", "-")


def test_feedback_parsing_and_the_interaction_it_becomes() -> None:
    assert parse_feedback({"id": "chatcmpl-1", "score": 1}) == ("chatcmpl-1", 1.0, None)
    bad: object
    for bad in ({"id": "x", "score": 2}, {"id": "x", "score": True}, {"score": 0.1},
                {"id": "x", "score": 0, "correction": " "}, []):
        with pytest.raises(FeedbackError):
            parse_feedback(bad)
    answer = Answer("chatcmpl-1", "alice", "default", 3, "q" * 9000, "the answer")
    event = feedback_event(answer, -0.5, None)
    assert (event.task, event.feedback, event.served_revision) == ("feedback", -0.5, 3)
    assert len(event.prompt) == 8192 and event.response == "the answer"
    fixed = feedback_event(answer, -0.5, "better")
    assert fixed.task == "reference" and fixed.reference == "better"
    assert fixed.event_id == event.event_id  # one feedback per answer, whatever its form
    with pytest.raises(FeedbackError):
        feedback_event(Answer("cmpl-1", None, "default", 0, "q", "a"), 1.0, None)


def test_prompt_text_of_chats_and_completions() -> None:
    assert prompt_text({"messages": [{"role": "user", "content": "hi"}]}, "chat") == "hi"
    parts = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(parts, "chat") == "system: be brief\nuser: hi"
    assert prompt_text({"prompt": "once"}, "completion") == "once"


def test_a_whole_answer_becomes_openai_chunks() -> None:
    out = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hey"},
                        "finish_reason": "length"}],
           "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
    chunks = as_chunks(out)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 4
    outcome = Outcome()
    for chunk in chunks:
        observe_chunk(outcome, chunk)
    assert (outcome.text, outcome.finish_reason, outcome.completion_tokens) == ("hey", "length",
                                                                                 3)
    text = as_chunks({"object": "text_completion", "choices": [{"index": 0, "text": "yo",
                                                                "finish_reason": "stop"}]})
    outcome = Outcome()
    for chunk in text:
        observe_chunk(outcome, chunk)
    assert outcome.text == "yo" and outcome.finish_reason == "stop"


async def test_streamed_engine_answers_pass_through_as_chunks() -> None:
    """An engine that streams (SGLang does) is relayed chunk by chunk; an error chunk raises."""
    import orjson
    from aiohttp import web

    from workers.serving.client import AsyncSGLangClient, SGLangError

    async def sse(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        for piece in ("he", "llo"):
            chunk = {"id": "u", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece},
                                  "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if body["model"] == "broken":
            await resp.write(b'data: {"error": {"message": "boom"}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", sse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    upstream = AsyncSGLangClient(url)
    try:
        outcome = Outcome()
        async for chunk in upstream.openai_stream("/v1/chat/completions", {"model": "m"}):
            observe_chunk(outcome, chunk)
        assert outcome.text == "hello" and outcome.chunks == 2
        with pytest.raises(SGLangError, match="boom"):
            async for _ in upstream.openai_stream("/v1/chat/completions", {"model": "broken"}):
                pass
    finally:
        await upstream.close()
        await runner.cleanup()


def test_a_gateway_without_redis_stops_at_start_with_one_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.cli.main import main

    monkeypatch.setenv("LORASTREAM_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens
    with pytest.raises(SystemExit) as stopped:
        main(["gateway", "--port", "0"])
    assert str(stopped.value.code).startswith("lorastream gateway: Redis (LORASTREAM_REDIS_URL) "
                                              "does not answer")
