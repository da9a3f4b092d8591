"""The gateway on the real broker and Redis, over CPU engines: the official `openai` client,
streaming, keys per namespace, feedback into `interactions`, promotion seen at once, online
rollback from production feedback, and an engine restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import safetensors.torch
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import REGISTRY

from infra.settings import Settings
from streams.sdk.gateway import GatewayClient
from streams.sdk.gateway import GatewayError as SdkError
from tests.support.adapters import make_adapter
from tests.support.catalog import evaluate_and_promote, record
from tests.support.gateway import ServingStack, engine
from tests.support.kafka import read_topic
from tests.support.waiting import wait_for
from workers.artifacts.store import WEIGHTS_FILE, ArtifactStore, adapter_config
from workers.catalog.writer import Catalog
from workers.models.base import LoraSpec
from workers.serving.client import SGLangClient
from workers.serving.gateway.apikeys import ApiKeys
from workers.serving.server import ServerThread

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


def publish(catalog: Catalog, base: Path, tmp: Path, policy: str, revision: int, seed: int,
            namespace: str = "default") -> None:
    """Export a revision into the artifact store, record and promote it (export + promote)."""
    src = make_adapter(base, tmp / f"{policy}-{revision}", seed=seed, scale=0.5)
    tensors = safetensors.torch.load_file(str(src / WEIGHTS_FILE))
    ref = ArtifactStore(catalog.settings.artifacts).put_adapter(
        tensors, adapter_config(LoraSpec(), str(base)))
    if namespace != "default" and catalog.index.get(policy) is None:
        from schemas.catalog import LoraConfig
        from tests.support.catalog import BASE_HASH

        catalog.register(policy, base_model="tiny", base_model_hash=BASE_HASH,
                         lora=LoraConfig(rank=1, alpha=2.0, target_modules=("q_proj",)),
                         namespace=namespace)
    assert record(catalog, policy, ref.sha256, step=revision) == revision
    evaluate_and_promote(catalog, policy, revision)


@pytest.fixture
def engines(tiny_model_dir: Path) -> Iterator[list[ServerThread]]:
    servers = [engine(tiny_model_dir)]
    yield servers
    for s in servers:
        s.stop()


def _at_least(events: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return events if len(events) >= n else []


def client(stack: ServingStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def test_openai_client_streaming_keys_and_feedback(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path,
        engines: list[ServerThread]) -> None:
    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    publish(catalog, tiny_model_dir, tmp_path, "carol", 1, seed=5, namespace="other")
    keys = ApiKeys(settings)
    secret, _ = keys.create("default", "test")
    other, _ = keys.create("other")
    with ServingStack(settings, engines) as stack:
        oa = client(stack, secret)
        first = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=6,
                                           temperature=0.0)
        assert first.model == "alice@1" and first.id.startswith("chatcmpl-")
        assert first.usage is not None and first.usage.completion_tokens > 0
        direct = SGLangClient(engines[0].url).chat_completion(
            [dict(m) for m in ASK], base_model="x", max_tokens=6, temperature=0.0)
        assert first.choices[0].message.content != direct["choices"][0]["message"]["content"]

        chunks = list(oa.chat.completions.create(
            model="alice", messages=ASK, max_tokens=6, temperature=0.0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == first.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert {c.model for c in chunks} == {"alice@1"}

        completion = oa.completions.create(model="alice@1", prompt="hi", max_tokens=3,
                                           temperature=0.0)
        assert completion.model == "alice@1" and completion.choices[0].text is not None
        listed = {m.id for m in oa.models.list()}
        assert "alice" in listed and "carol" not in listed
        # The base model by name (`base`, or the id the engines report): no adapter at all.
        base_id = SGLangClient(engines[0].url).models()[0]["id"]
        assert base_id in listed
        for name in ("base", base_id):
            bare = oa.chat.completions.create(model=name, messages=ASK, max_tokens=6,
                                              temperature=0.0)
            assert bare.model == "base"
            assert bare.choices[0].message.content == direct["choices"][0]["message"]["content"]
        with pytest.raises(openai.BadRequestError, match="no policy to train"):
            oa.post("/feedback", cast_to=dict, body={"id": bare.id, "score": 1.0})

        with pytest.raises(openai.NotFoundError, match="does not exist"):
            oa.chat.completions.create(model="mallory", messages=ASK, max_tokens=2)
        with pytest.raises(openai.NotFoundError):  # another namespace's policy looks unknown
            client(stack, other).chat.completions.create(model="alice", messages=ASK)
        assert client(stack, other).chat.completions.create(
            model="carol", messages=ASK, max_tokens=2).model == "carol@1"
        with pytest.raises(openai.AuthenticationError):
            client(stack, "lsk-nope-nope").chat.completions.create(model="alice", messages=ASK)

        receipt = oa.post("/feedback", cast_to=dict,
                          body={"id": first.id, "score": 0.5})
        assert receipt["policy"] == "alice" and receipt["revision"] == 1
        fixed = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=4)
        oa.post("/feedback", cast_to=dict, body={"id": fixed.id, "score": -1.0,
                                                 "correction": "hi!"})
        with pytest.raises(openai.ConflictError):
            oa.post("/feedback", cast_to=dict, body={"id": first.id, "score": -0.5})
        with pytest.raises(openai.NotFoundError):  # other namespaces cannot rate it
            client(stack, other).post("/feedback", cast_to=dict,
                                      body={"id": first.id, "score": 1.0})

        logged = wait_for(lambda: _at_least(read_topic(settings, "interactions"), 2), 30,
                          message="feedback on interactions")
        by_id = {e["answer_id"]: e for e in logged}
        assert by_id[first.id]["task"] == "feedback" and by_id[first.id]["feedback"] == 0.5
        assert by_id[first.id]["served_revision"] == 1
        assert by_id[first.id]["prompt"] == "hello there"
        assert by_id[first.id]["response"] == first.choices[0].message.content
        assert by_id[fixed.id]["task"] == "reference" and by_id[fixed.id]["reference"] == "hi!"
        served = wait_for(lambda: _at_least(read_topic(settings, "served"), 4), 30,
                          message="answers on served")
        assert {e["revision"] for e in served if e["policy_id"] == "alice"} == {1}
        assert all(e["completion_tokens"] > 0 and e["latency_ms"] > 0 for e in served)

        # A promotion is seen by the next request; a pinned revision still answers.
        publish(catalog, tiny_model_dir, tmp_path, "alice", 2, seed=2)
        assert oa.chat.completions.create(model="alice", messages=ASK,
                                          max_tokens=2).model == "alice@2"
        assert oa.chat.completions.create(model="alice@1", messages=ASK,
                                          max_tokens=2).model == "alice@1"
        with pytest.raises(openai.NotFoundError):
            oa.chat.completions.create(model="alice@9", messages=ASK, max_tokens=2)

        # Per-adapter metrics on both sides (one registry here: gateway and engine in-process).
        for component in ("gateway", "engine"):
            labels = {"component": component, "policy": "alice", "revision": "1"}
            assert (REGISTRY.get_sample_value("lorastream_adapter_requests_total", labels)
                    or 0) >= 3
            assert (REGISTRY.get_sample_value("lorastream_adapter_tokens_total",
                                               {**labels, "direction": "out"}) or 0) > 0
        assert (REGISTRY.get_sample_value("lorastream_adapter_errors_total", {
            "component": "gateway", "policy": "-", "revision": "-", "code": "404"}) or 0) >= 1


def test_production_feedback_rolls_back_a_worse_revision(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path,
        engines: list[ServerThread]) -> None:
    run = settings.model_copy(update={"feedback_rollback_min_count": 3,
                                      "feedback_rollback_window": 5})
    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    secret, _ = ApiKeys(run).create("default")
    with ServingStack(run, engines) as stack:
        sdk = GatewayClient(stack.url, secret)

        def rate(score: float) -> dict:  # through the SDK this time
            answer = sdk.chat("alice", "hello there", max_tokens=2)
            return sdk.feedback(answer.id, score)

        assert [rate(0.8)["revision"] for _ in range(3)] == [1, 1, 1]
        publish(catalog, tiny_model_dir, tmp_path, "alice", 2, seed=2)
        receipts = [rate(-0.5) for _ in range(3)]
        assert [r["revision"] for r in receipts] == [2, 2, 2]
        assert [r["rolled_back_to"] for r in receipts] == [None, None, 1]
        # The same path as `lorastream rollback`: catalog, hot set, and a PolicyRolledBack.
        assert catalog.index.serving("alice").revision == 1
        rolled = wait_for(lambda: [e for e in read_topic(run, "promotions")
                                   if e.get("kind") == "policy_rolled_back"], 30)
        assert rolled[0]["from_revision"] == 2 and rolled[0]["to_revision"] == 1
        assert "production feedback" in rolled[0]["reason"]
        assert sdk.chat("alice", "hello", max_tokens=2).revision == 1
        with pytest.raises(SdkError) as refused:
            sdk.feedback("chatcmpl-nope", 1.0)
        assert refused.value.status == 404


@pytest.mark.parametrize("probe_s", [0.2, 3600.0], ids=["probed", "reported-by-a-request"])
def test_engine_restart_is_noticed_and_adapters_reloaded(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path,
        engines: list[ServerThread], probe_s: float) -> None:
    """The controller notices a restart by probing the engine or, for an engine that lists no
    adapters (older SGLang) or a restart between probes, because a request through the gateway
    found the adapter missing (with probing off, that report is the only way it can know)."""
    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    secret, _ = ApiKeys(settings).create("default")
    with ServingStack(settings, engines, probe_interval_s=probe_s) as stack:
        oa = client(stack, secret)
        want = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=5,
                                          temperature=0.0)
        port = int(engines[0].url.rsplit(":", 1)[1])
        engines[0].stop()  # a crash: the engine comes back empty on the same address
        engines[0] = engine(tiny_model_dir, port=port)
        try:  # at once: the right adapter or a 503, never the bare base model in its place
            early = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=5,
                                               temperature=0.0)
            assert early.choices[0].message.content == want.choices[0].message.content
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.response.headers["Retry-After"]
        direct = SGLangClient(engines[0].url)
        wait_for(lambda: "alice@1" in {m["id"] for m in direct.models()}, 30,
                 message="the controller to reload alice@1 on the restarted engine")
        again = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=5,
                                           temperature=0.0)
        assert again.model == "alice@1"
        assert again.choices[0].message.content == want.choices[0].message.content


def test_unavailable_adapters_are_503_with_retry_after_never_the_base(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path,
        engines: list[ServerThread]) -> None:
    publish(catalog, tiny_model_dir, tmp_path, "eve", 1, seed=3)
    sha = catalog.index.serving("eve").sha256
    weights = ArtifactStore(settings.artifacts).adapter_path(str(sha)) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # corrupt at rest
    secret, _ = ApiKeys(settings).create("default")
    with ServingStack(settings, engines) as stack:
        oa = client(stack, secret)
        with pytest.raises(openai.APIStatusError) as failed:
            oa.chat.completions.create(model="eve", messages=ASK, max_tokens=2)
        assert failed.value.status_code == 503
        assert failed.value.response.headers["Retry-After"] == "30"
        assert "sha256" in failed.value.message


def test_keys_cli_create_list_revoke(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import orjson

    from streams.cli.main import main

    monkeypatch.setenv("LORASTREAM_REDIS_PREFIX", settings.redis_prefix)
    assert main(["keys", "create", "--namespace", "team-a", "--name", "ci", "--json"]) == 0
    made = orjson.loads(capsys.readouterr().out)
    keys = ApiKeys(settings)
    found = keys.check(made["key"])
    assert found is not None and found.namespace == "team-a"
    stored = keys.r.hget(keys.keys.api_keys(), made["key_id"])
    assert isinstance(stored, bytes) and made["key"].encode() not in stored  # only its hash
    assert main(["keys", "list", "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert [(k["key_id"], k["namespace"]) for k in listed] == [(made["key_id"], "team-a")]
    assert main(["keys", "revoke", made["key_id"]]) == 0
    assert keys.check(made["key"]) is None
    assert main(["keys", "revoke", made["key_id"]]) == 1


def test_in_flight_requests_finish_on_the_revision_they_started_on(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path,
        engines: list[ServerThread]) -> None:
    import threading

    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    secret, _ = ApiKeys(settings).create("default")
    with ServingStack(settings, engines) as stack:
        oa = client(stack, secret)
        for seed in range(20):  # a seeded sample long enough to promote during it
            want = oa.chat.completions.create(model="alice", messages=ASK, max_tokens=300,
                                              seed=seed)
            if want.usage is not None and want.usage.completion_tokens >= 100:
                break
        assert want.usage is not None and want.usage.completion_tokens >= 100
        result: list = []
        worker = threading.Thread(target=lambda: result.append(
            oa.chat.completions.create(model="alice", messages=ASK, max_tokens=300,
                                       seed=seed)))
        worker.start()
        registry = engines[0].engine.registry
        wait_for(lambda: (ref := registry.get("alice@1")) is not None and ref.in_flight > 0,
                 30, interval=0.005, message="the long request in flight on alice@1")
        publish(catalog, tiny_model_dir, tmp_path, "alice", 2, seed=2)
        assert oa.chat.completions.create(model="alice", messages=ASK,
                                          max_tokens=2).model == "alice@2"
        worker.join(60)
        (old,) = result
        assert old.model == "alice@1"
        assert old.choices[0].message.content == want.choices[0].message.content


def test_a_cold_load_that_does_not_finish_in_time_is_503_never_the_base(
        settings: Settings, catalog: Catalog, tiny_model_dir: Path, tmp_path: Path) -> None:
    """An engine is live but its controller never loads the adapter: the request schedules the
    load (demand on its home engine), waits `gateway_cold_timeout_s`, then gets a 503 with
    Retry-After; nothing answers it from the base model."""
    import redis

    from workers.serving.assignment import engine_key, register_engine

    run = settings.model_copy(update={"gateway_cold_timeout_s": 0.5})
    publish(catalog, tiny_model_dir, tmp_path, "alice", 1, seed=1)
    secret, _ = ApiKeys(run).create("default")
    r = redis.Redis.from_url(run.redis_url)
    register_engine(run, r, "stalled", "http://127.0.0.1:9")  # alive, but nothing loads there
    before = REGISTRY.get_sample_value("lorastream_gateway_cold_waits_total",
                                       {"outcome": "timeout"}) or 0
    try:
        with ServingStack(run, []) as stack:
            with pytest.raises(openai.APIStatusError) as waited:
                client(stack, secret).chat.completions.create(model="alice", messages=ASK,
                                                              max_tokens=2)
            assert waited.value.status_code == 503
            assert waited.value.response.headers["Retry-After"] == "2"
            assert "alice@1 is loading" in waited.value.message
            assert r.zscore(engine_key(run, "stalled", "demand"), "alice@1") is not None
            assert not r.zcard(engine_key(run, "stalled", "waiting"))  # its ticket withdrawn
        assert REGISTRY.get_sample_value("lorastream_gateway_cold_waits_total",
                                         {"outcome": "timeout"}) == before + 1
    finally:
        r.close()
