"""The SGLang client against SGLang's documented requests and responses (`http_server.py`,
`io_struct.py`, `tokenizer_control_mixin.py` in `python/sglang/srt/`, and SGLang's LoRA docs).

A stub HTTP server answers with the bodies SGLang's source produces and records what the client
sent, so the client is checked against SGLang itself, not only against our CPU engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from workers.serving.client import AsyncSGLangClient, SGLangClient, SGLangError

# Observed in a CI run of SGLang's docs (`docs/advanced_features/lora.ipynb`, 2026-03-03).
LOAD_OK = {"rid": None, "http_worker_ipc": None, "success": True, "error_message": "",
           "loaded_adapters": {"lora0": "Nutanix/a", "lora1": "algoprog/b"}}
# tokenizer_control_mixin: ValueError -> LoRAUpdateOutput(success=False, error_message=str(e)).
LOAD_FAIL = {"rid": None, "http_worker_ipc": None, "success": False,
             "error_message": "Didn't find any LoRA adapters when trying to evict LRU LoRA "
                              "adapter. LoRA registry is: {}", "loaded_adapters": None}
# http_server: ValueError in /generate -> 400 {"error": {"message": str(e)}}.
GEN_FAIL = {"error": {"message": "Got LoRA adapter that has never been loaded: ghost\n"
                                 "All loaded adapters: dict_keys(['lora0'])"}}
# TokenizerManager output with return_logprob (triples [logprob, token_id, None]).
GEN_OK = [{"text": " Paris", "output_ids": [12366, 2],
           "meta_info": {"id": "abc", "finish_reason": {"type": "stop", "matched": 2},
                         "prompt_tokens": 7, "weight_version": "default",
                         "completion_tokens": 2, "cached_tokens": 0, "e2e_latency": 0.05,
                         "input_token_logprobs": [[None, 1, None]],
                         "output_token_logprobs": [[-0.25, 12366, None], [-0.01, 2, None]]}},
          {"text": " Rome", "output_ids": [21], "meta_info": {
              "id": "abd", "finish_reason": {"type": "length", "length": 1},
              "prompt_tokens": 7, "completion_tokens": 1,
              "output_token_logprobs": [[-1.5, 21, None]]}}]


class _Stub(BaseHTTPRequestHandler):
    replies: dict[str, tuple[int, Any]] = {}
    seen: list[tuple[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body))
        status, reply = self.replies[self.path]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Stub", (_Stub,), {"replies": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    thread.join()


def test_load_and_unload_send_sglang_bodies(stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.replies["/load_lora_adapter"] = (200, LOAD_OK)
    handler.replies["/unload_lora_adapter"] = (200, {**LOAD_OK, "loaded_adapters": {}})
    client = SGLangClient(url)
    out = client.load_lora_adapter("lora0", "/adapters/x", pinned=True)
    assert out.success and out.loaded_adapters == LOAD_OK["loaded_adapters"]
    assert client.unload_lora_adapter("lora0").loaded_adapters == {}
    assert handler.seen == [
        ("/load_lora_adapter", {"lora_name": "lora0", "lora_path": "/adapters/x",
                                "pinned": True}),
        ("/unload_lora_adapter", {"lora_name": "lora0"}),
    ]


def test_failed_update_and_generate_400_raise_with_the_server_message(
        stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.replies["/load_lora_adapter"] = (400, LOAD_FAIL)
    handler.replies["/generate"] = (400, GEN_FAIL)
    client = SGLangClient(url)
    with pytest.raises(SGLangError, match="evict LRU") as exc:
        client.load_lora_adapter("lora2", "/adapters/y")
    assert exc.value.status == 400 and exc.value.body == LOAD_FAIL
    with pytest.raises(SGLangError, match="never been loaded: ghost"):
        client.generate("hi", lora_path="ghost")


def test_generate_parses_logprob_triples_and_sends_lora_path(
        stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.replies["/generate"] = (200, GEN_OK)
    gens = SGLangClient(url).sample(["capital?"], "lora0", n=2, max_new_tokens=4, seed=5)
    (path, body), = handler.seen
    assert path == "/generate" and body["text"] == ["capital?", "capital?"]
    assert body["lora_path"] == ["lora0", "lora0"] and body["return_logprob"] is True
    seeds = [p["sampling_seed"] for p in body["sampling_params"]]
    assert len(set(seeds)) == 2  # each sample of a group gets its own seed
    first, second = gens[0]
    assert first.token_ids == [12366, 2] and first.logprobs == [-0.25, -0.01]
    assert first.finished and first.matched_stop == 2
    assert not second.finished and second.finish_reason == "length"


def test_async_client_speaks_the_same_api(stub: tuple[str, type[_Stub]]) -> None:
    url, handler = stub
    handler.replies["/load_lora_adapter"] = (200, LOAD_OK)
    handler.replies["/generate"] = (200, GEN_OK[0])

    async def main() -> None:
        async with AsyncSGLangClient(url) as client:
            assert (await client.load_lora_adapter("lora0", "/a")).success
            (gen,) = await client.generate("hi", lora_path="lora0")
            assert gen.text == " Paris"

    asyncio.run(main())
    assert handler.seen[1][1] == {"text": "hi", "return_logprob": True, "lora_path": "lora0"}
