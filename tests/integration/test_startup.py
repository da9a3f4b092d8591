"""An unsupported base is refused when a worker starts, never by dead-lettering its events.

A GPT-2 base (fused `c_attn` Conv1D projections, not in the architecture registry) makes
`lorastream worker` exit at once with one message naming the architecture and what is
supported; the interaction waiting on the topic is not consumed, so there is no dead letter and
a correctly configured worker can still process it.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from infra.admin import consumer_lag
from infra.settings import Settings
from streams.app import create_app, group_id
from tests.support.kafka import produce_raw, read_topic
from tests.support.processes import lorastream
from workers.models.base import _char_tokenizer, build_model_dir
from workers.pipeline.preflight import EX_CONFIG, Misconfigured


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def write(tmp: Path) -> None:
        tokenizer = _char_tokenizer()
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                            n_positions=64)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_model_dir(tmp_path_factory.mktemp("gpt2") / "gpt2", write)


def test_unsupported_base_is_refused_at_startup_and_nothing_is_dead_lettered(
        settings: Settings, gpt2_dir: Path) -> None:
    run = settings.model_copy(update={"base_model": gpt2_dir})
    produce_raw(run, "interactions", [(b"alice", orjson.dumps(
        {"policy_id": "alice", "prompt": "hi?", "task": "length"}))])
    with pytest.raises(Misconfigured, match=r"'gpt2'.*supported model types: llama"):
        create_app(run, ["rollout", "reward", "update"])
    proc = lorastream(run, "worker", "--stages", "all")
    assert proc.returncode == EX_CONFIG
    message = proc.stderr
    assert "cannot start" in message and "'gpt2' (GPT2LMHeadModel)" in message
    assert "deepseek_v3" in message and "Traceback" not in message
    assert read_topic(run, "dead-letters") == []
    group = group_id(run, ["rollout", "reward", "update", "export", "evaluate", "promote"])
    assert consumer_lag(run, group) == []  # no consumer ever joined: the event still waits


def test_targets_that_select_nothing_are_refused_at_startup(settings: Settings,
                                                             tiny_model_dir: Path) -> None:
    run = settings.model_copy(update={"base_model": tiny_model_dir, "lora_targets": "experts"})
    with pytest.raises(Misconfigured, match="select nothing"):
        create_app(run, ["update"])
    frozen = run.model_copy(update={"lora_targets": "attn,no_such_proj"})
    with pytest.raises(Misconfigured, match="no_such_proj"):
        create_app(frozen, ["rollout"])
    create_app(run.model_copy(update={"lora_targets": "attn"}), ["reward"])  # no model stage
