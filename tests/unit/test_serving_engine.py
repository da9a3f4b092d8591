"""The SGLang client against the CPU engine over real HTTP: API shapes and capacity semantics."""

from __future__ import annotations

import ctypes
import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.adapters import make_adapter
from workers.serving.client import SGLangClient, SGLangError
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.sampler import RowRequest, RowResult
from workers.serving.server import ServerThread

SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 11}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {f"p{i}@1": make_adapter(tiny_model_dir, root / f"p{i}", seed=i, scale=0.5)
            for i in range(5)}


def _server(base: Path, **kw: Any) -> ServerThread:
    config = EngineConfig(base_path=base, max_lora_rank=4, served_model_name="tiny", **kw)
    return ServerThread(CpuEngine(config)).start()


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    srv = _server(tiny_model_dir, max_loaded_loras=3, max_loras_per_batch=3)
    yield srv
    srv.stop()


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_load_unload_and_errors_follow_sglang(server: ServerThread,
                                              adapters: dict[str, Path]) -> None:
    client = SGLangClient(server.url)
    assert client.health()
    out = client.load_lora_adapter("p0@1", str(adapters["p0@1"]))
    assert out.success and out.loaded_adapters == {"p0@1": str(adapters["p0@1"])}
    status, body = _post(server.url + "/load_lora_adapter",
                         {"lora_name": "p0@1", "lora_path": str(adapters["p0@1"])})
    assert status == 400 and body["success"] is False and "already loaded" in \
        body["error_message"]
    with pytest.raises(SGLangError) as missing:
        client.load_lora_adapter("x@1", "/nonexistent/dir")
    assert missing.value.status == 400
    with pytest.raises(SGLangError, match="never been loaded"):
        client.generate("hi", lora_path="ghost@1", sampling_params=SAMPLING)
    assert client.unload_lora_adapter("p0@1").loaded_adapters == {}
    with pytest.raises(SGLangError, match="not loaded"):
        client.unload_lora_adapter("p0@1")


def test_generate_shapes_and_logprob_triples(server: ServerThread,
                                             adapters: dict[str, Path]) -> None:
    SGLangClient(server.url).load_lora_adapter("p1@1", str(adapters["p1@1"]))
    status, single = _post(server.url + "/generate", {
        "text": "hello", "lora_path": "p1@1", "sampling_params": SAMPLING,
        "return_logprob": True})
    assert status == 200 and isinstance(single, dict)
    meta = single["meta_info"]
    assert meta["finish_reason"]["type"] in ("stop", "length")
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == single["output_ids"]
    assert all(t[2] is None and t[0] <= 0.0 for t in triples)
    status, batch = _post(server.url + "/generate", {
        "input_ids": [[1, 40, 41], [1, 42]], "lora_path": ["p1@1", None],
        "sampling_params": SAMPLING})
    assert status == 200 and isinstance(batch, list) and len(batch) == 2
    assert "output_token_logprobs" not in batch[0]["meta_info"]  # return_logprob defaults off
    status, bad = _post(server.url + "/generate", {"text": "x", "sampling_params":
                                                    {"top_p": 0.5}})
    assert status == 400 and "top_p" in bad["error"]["message"]


def test_mixed_adapter_batch_matches_solo_requests(server: ServerThread,
                                                   adapters: dict[str, Path]) -> None:
    client = SGLangClient(server.url)
    names = ["p0@1", "p1@1", "p2@1"]
    for name in names:
        client.load_lora_adapter(name, str(adapters[name]))
    solo = [client.generate("abc", lora_path=n, sampling_params=SAMPLING)[0] for n in names]
    engine = server.engine
    engine.max_adapters_in_a_batch = 0
    mixed = client.generate(["abc"] * 3, lora_path=names, sampling_params=SAMPLING)
    assert engine.max_adapters_in_a_batch == 3  # one forward pass served all three
    assert [g.token_ids for g in mixed] == [g.token_ids for g in solo]
    for m, s in zip(mixed, solo, strict=True):
        assert m.logprobs == pytest.approx(s.logprobs, abs=1e-4)
    with ThreadPoolExecutor(3) as pool:  # concurrent requests agree with solo ones too
        futures = [pool.submit(client.generate, "abc", lora_path=n, sampling_params=SAMPLING)
                   for n in names]
        assert [f.result()[0].token_ids for f in futures] == [g.token_ids for g in solo]


def test_max_loras_per_batch_splits_batches(tiny_model_dir: Path,
                                            adapters: dict[str, Path]) -> None:
    srv = _server(tiny_model_dir, max_loaded_loras=4, max_loras_per_batch=2)
    try:
        client = SGLangClient(srv.url)
        names = ["p0@1", "p1@1", "p2@1"]
        for name in names:
            client.load_lora_adapter(name, str(adapters[name]))
        out = client.generate(["abc"] * 4, lora_path=[*names, None], sampling_params=SAMPLING)
        assert len(out) == 4
        assert srv.engine.max_adapters_in_a_batch == 2
    finally:
        srv.stop()


def test_lru_eviction_pinning_and_implicit_reload(server: ServerThread,
                                                  adapters: dict[str, Path]) -> None:
    client = SGLangClient(server.url)  # max_loaded_loras=3, max_loras_per_batch=3
    client.load_lora_adapter("p0@1", str(adapters["p0@1"]), pinned=True)
    client.load_lora_adapter("p1@1", str(adapters["p1@1"]))
    client.load_lora_adapter("p2@1", str(adapters["p2@1"]))
    with pytest.raises(SGLangError, match="pin"):  # at most max_loras_per_batch - 1 pinned
        for name in ("p3@1", "p4@1"):
            client.load_lora_adapter(name, str(adapters[name]), pinned=True)
    loaded = client.load_lora_adapter("p4@1", str(adapters["p4@1"])).loaded_adapters
    assert "p0@1" in loaded and "p3@1" in loaded and len(loaded) == 3  # LRU went, pin stayed
    evicted = ({"p1@1", "p2@1"} - set(loaded)).pop()
    out = client.generate("abc", lora_path=evicted, sampling_params=SAMPLING)  # reloads
    assert out[0].token_ids
    assert evicted in {m["id"] for m in client.models()}


def test_openai_routes_name_the_adapter_in_model(server: ServerThread,
                                                 adapters: dict[str, Path]) -> None:
    client = SGLangClient(server.url)
    client.load_lora_adapter("p1@1", str(adapters["p1@1"]))
    params: dict[str, Any] = {"max_tokens": 5, "temperature": 0.0}
    messages = [{"role": "user", "content": "hi"}]
    via_model = client.chat_completion(messages, base_model="tiny", adapter="p1@1", **params)
    via_body = client.chat_completion(messages, base_model="tiny", lora_path="p1@1", **params)
    base = client.chat_completion(messages, base_model="tiny", **params)
    assert via_model["object"] == "chat.completion" and via_model["model"] == "tiny:p1@1"
    text = via_model["choices"][0]["message"]["content"]
    assert text == via_body["choices"][0]["message"]["content"]
    assert via_model["usage"]["completion_tokens"] >= 1
    assert base["choices"][0]["finish_reason"] in ("stop", "length")
    status, err = _post(server.url + "/v1/chat/completions",
                        {"model": "tiny:ghost@1", "messages": messages})
    assert status == 400 and err["object"] == "error" and "never been loaded" in err["message"]
    status, comp = _post(server.url + "/v1/completions",
                         {"model": "tiny:p1@1", "prompt": ["a", "b"], "max_tokens": 3,
                          "logprobs": 0})
    assert status == 200 and len(comp["choices"]) == 2
    assert len(comp["choices"][0]["logprobs"]["token_logprobs"]) >= 1


def test_num_threads_applies_to_the_engine_threads_only(tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP's thread count is per thread: the engine's setting must not change the caller's.
    (`torch.get_num_threads()` reports torch's process-wide default, so the per-thread count
    is read from the OpenMP runtime torch itself loaded.)"""
    omp = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = CpuEngine(EngineConfig(base_path=tiny_model_dir, max_lora_rank=4, num_threads=1))
    sampler = engine.sampler
    seen: list[int] = []
    decode = sampler._decode

    def spy(rows: list[RowRequest]) -> list[RowResult]:
        seen.append(omp.omp_get_max_threads())
        return decode(rows)

    monkeypatch.setattr(sampler, "_decode", spy)
    try:
        rows = [RowRequest(sampler.encode("hi"), None, max_new_tokens=1)]
        engine._executor.submit(sampler.generate, rows).result()
        assert seen == [1]
        assert omp.omp_get_max_threads() == 2
    finally:
        engine._executor.shutdown()
        torch.set_num_threads(before)


def test_all_model_work_runs_on_one_model_thread(tiny_model_dir: Path, adapters: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the base, loading adapters and generating all happen on one thread that is not
    the caller's: a second thread running parallel torch work gives the process a second
    OpenMP team, which throttles every barrier once teams outnumber the CPUs (`cpu_engine`)."""
    import threading

    import workers.serving.cpu_engine as cpu_engine

    seen: list[tuple[str, int]] = []

    class Spy(cpu_engine.SlotSampler):
        def __init__(self, *args: Any, **kw: Any) -> None:
            seen.append(("init", threading.get_ident()))
            super().__init__(*args, **kw)

        def load(self, slot: int, adapter_dir: Path) -> None:
            seen.append(("load", threading.get_ident()))
            super().load(slot, adapter_dir)

        def generate(self, rows: list[RowRequest]) -> list[RowResult]:
            seen.append(("generate", threading.get_ident()))
            return super().generate(rows)

    monkeypatch.setattr(cpu_engine, "SlotSampler", Spy)
    srv = _server(tiny_model_dir)
    try:
        client = SGLangClient(srv.url)
        client.load_lora_adapter("p0@1", str(adapters["p0@1"]))
        client.generate("hi", lora_path="p0@1", sampling_params=SAMPLING)
        client.generate("hi", sampling_params=SAMPLING)
    finally:
        srv.stop()
    assert [kind for kind, _ in seen] == ["init", "load", "generate", "generate"]
    threads = {ident for _, ident in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads
