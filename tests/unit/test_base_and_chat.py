"""Any causal LM as base (local dir or a cached hub id, offline), chat templates, end ids.

- a hub id resolves to its local Hugging Face cache snapshot, never downloads, and is the same
  base (same hash of weights and config) as the directory it came from;
- a chat template renders `messages` (and a plain prompt as one user turn) to the ids the
  engine samples from; without a template, `messages` are refused;
- the engine stops on every end id the model declares (generation config included), on
  `stop_token_ids`, and never with SGLang's `ignore_eos`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from workers.models.base import base_model_hash, load_base_model, resolve_base
from workers.models.chat import end_ids, render_prompt
from workers.serving.protocol import BadRequest, row_from_params
from workers.serving.sampler import RowRequest, SlotSampler

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def _fake_hub_cache(tmp_path: Path, model_dir: Path, repo: str) -> Path:
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    shutil.copytree(model_dir, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    return cache


def test_hub_id_resolves_from_the_local_cache_only(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _fake_hub_cache(tmp_path, tiny_model_dir, "acme/tiny-llama")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    path = resolve_base("acme/tiny-llama")
    assert path.is_dir() and path.name == "abc123"
    assert base_model_hash("acme/tiny-llama") == base_model_hash(tiny_model_dir)
    model, _ = load_base_model("acme/tiny-llama")
    assert model.config.model_type == "llama"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_base("acme/not-cached")
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        resolve_base(tmp_path / "missing" / "dir" / "x")


def test_chat_template_renders_messages_and_plain_prompts(tiny_model_dir: Path) -> None:
    _, tokenizer = load_base_model(tiny_model_dir)
    assert render_prompt(tokenizer, "hi") == list(tokenizer("hi")["input_ids"])
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tokenizer, "hi", [{"role": "user", "content": "hi"}])
    tokenizer.chat_template = TEMPLATE
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = render_prompt(tokenizer, "hi", chat)
    text = "<s>system: be brief\n<s>user: hi\n<s>assistant: "
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert render_prompt(tokenizer, "hi") == render_prompt(tokenizer, None,
                                                           [{"role": "user", "content": "hi"}])


def _with_end_ids(src: Path, dst: Path, extra: int) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], extra]
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


def test_engine_stops_on_every_declared_end_id_unless_ignore_eos(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    plain = SlotSampler(tiny_model_dir, num_slots=1, max_rank=4)
    prompt = plain.encode("count: ")
    greedy = plain.generate([RowRequest(prompt, None, max_new_tokens=8, temperature=0.0,
                                        ignore_eos=True)])[0]
    assert len(greedy.output_ids) == 8 and greedy.matched_stop is None
    stop = greedy.output_ids[2]
    first = greedy.output_ids.index(stop)
    declared = SlotSampler(_with_end_ids(tiny_model_dir, tmp_path / "m", stop), num_slots=1,
                           max_rank=4)
    assert stop in declared.eos_ids and declared.tokenizer.eos_token_id in declared.eos_ids
    assert end_ids(declared.tokenizer, declared.model) == declared.eos_ids
    rows = [RowRequest(prompt, None, max_new_tokens=8, temperature=0.0),
            RowRequest(prompt, None, max_new_tokens=8, temperature=0.0, ignore_eos=True),
            RowRequest(prompt, None, max_new_tokens=8, temperature=0.0,
                       stop_token_ids=frozenset({greedy.output_ids[0]}))]
    stopped, ignored, by_param = declared.generate(rows)
    assert stopped.output_ids == greedy.output_ids[:first + 1] and stopped.matched_stop == stop
    assert ignored.output_ids == greedy.output_ids and ignored.matched_stop is None
    assert by_param.output_ids == greedy.output_ids[:1]


def test_sglang_params_ignore_eos_and_stop_token_ids() -> None:
    row = row_from_params([1, 2], {"ignore_eos": True, "stop_token_ids": [5, 7],
                                   "max_new_tokens": 3})
    assert row.ignore_eos and row.stop_token_ids == frozenset({5, 7})
    with pytest.raises(BadRequest, match="stop strings"):
        row_from_params([1], {"stop": ["\n"]})


def test_the_stages_send_rendered_ids_and_every_end_id(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """Rollout and evaluation prompt the engine with the chat-rendered ids (what the trainer
    later trains on) and pass every declared end id as `stop_token_ids`."""
    from workers.serving.client import Generation, SGLangClient
    from workers.serving.sampling import EngineSampler, SampleRequest

    sent: list[dict[str, Any]] = []

    class Client(SGLangClient):
        def generate(self, prompts: Any, **kwargs: Any) -> list[Generation]:
            sent.append({"prompts": prompts, **kwargs})
            return [Generation("x", [5], [-0.1], "length", None, 1, {}) for _ in prompts]

    base = _with_end_ids(tiny_model_dir, tmp_path / "m", 7)
    sampler = EngineSampler.connect("http://127.0.0.1:9", base)
    sampler.client = Client("http://127.0.0.1:9")
    sampler.tokenizer.chat_template = TEMPLATE
    ids = sampler.render("hi", [{"role": "user", "content": "hi"}])
    sampler.generate_many([SampleRequest(ids, None, 1)], n=2, max_new_tokens=3)
    (call,) = sent
    assert call["prompts"] == [ids, ids]
    want = sorted({7, int(sampler.tokenizer.eos_token_id)})
    assert all(p["stop_token_ids"] == want for p in call["sampling_params"])
