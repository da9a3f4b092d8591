from __future__ import annotations

import string
from pathlib import Path

from transformers import LlamaForCausalLM

from workers.models.base import LoraSpec, base_model_hash, build_tiny_model, load_base_model

ASCII = string.ascii_letters + string.digits + string.punctuation + " \n\t"


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before


def test_round_trip_through_from_pretrained(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {
        "<pad>", "<s>", "</s>"}


def test_tokenizer_is_character_level(tiny_model_dir: Path) -> None:
    _, tokenizer = load_base_model(tiny_model_dir)
    ids = tokenizer(ASCII)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(ASCII) + 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == ASCII


def test_hash_is_stable_and_identifies_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    digest = base_model_hash(tiny_model_dir)
    assert digest == base_model_hash(tiny_model_dir)
    assert len(digest) == 64
    other = build_tiny_model(tmp_path / "other", seed=1, hidden_size=32, num_layers=1)
    assert base_model_hash(other) != digest


def test_lora_spec_config() -> None:
    cfg = LoraSpec(rank=2, alpha=4.0).peft_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (2, 4.0, 0.0, "none")
    assert isinstance(cfg.target_modules, (list, set))  # peft's type also allows a str or None
    assert set(cfg.target_modules) == set(LoraSpec().target_modules)
