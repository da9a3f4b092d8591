from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch

from schemas.errors import PoisonEventError
from workers.artifacts.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactStore,
    adapter_config,
    serialize_tensors,
)
from workers.models.base import LoraSpec, load_base_model
from workers.reference.trainer import PolicyTrainer
from workers.training.grpo import TrainGroup

LORA = LoraSpec(rank=2, alpha=4.0)


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"b.lora_B.weight": torch.randn(8, 2, generator=gen),
            "a.lora_A.weight": torch.randn(2, 8, generator=gen)}


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = store.put_adapter(tensors(), adapter_config(LORA, "base"))
    data = (ref.path / WEIGHTS_FILE).read_bytes()
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size_bytes == len(data)
    assert ref.path == tmp_path / "adapters" / ref.sha256
    assert sorted(p.name for p in ref.path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    config = json.loads((ref.path / CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4.0)
    mtime = (ref.path / WEIGHTS_FILE).stat().st_mtime_ns
    reordered = dict(reversed(list(tensors().items())))
    assert store.put_adapter(reordered, adapter_config(LORA, "base")) == ref
    assert (ref.path / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert store.put_adapter(tensors(1), adapter_config(LORA, "base")).sha256 != ref.sha256
    assert store.adapter_path(ref.sha256) == ref.path
    assert list((tmp_path / "tmp").iterdir()) == []


def test_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.put_adapter(tensors(), adapter_config(LORA, "base"))
    assert list((tmp_path / "adapters").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_verify_detects_corruption(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = store.put_adapter(tensors(), adapter_config(LORA, "base"))
    assert store.verify(ref.sha256)
    weights = ref.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not store.verify(ref.sha256)
    assert not store.verify("0" * 64)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "0" * 63, "/" + "0" * 63, ""])
def test_path_traversal_refused(tmp_path: Path, bad: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(PoisonEventError):
        store.adapter_path(bad)
    with pytest.raises(PoisonEventError):
        store.stage("../evil", 1, tensors())
    with pytest.raises(FileNotFoundError):
        store.adapter_path("f" * 64)


def test_stage_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    path = store.stage("policy-1", 3, tensors())
    assert path == tmp_path / "staging" / "policy-1" / "3.safetensors"
    loaded = store.load_tensors(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())
    assert [p.name for p in path.parent.iterdir()] == ["3.safetensors"]


def test_export_loads_in_peft_with_same_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = PolicyTrainer(tiny_model_dir, LORA)
    prompt = trainer.tokenizer("Hello")["input_ids"]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(4, 100, (5,), generator=gen).tolist() for _ in range(4)]
    group = TrainGroup(prompt, completions, [[-4.6] * 5] * 4, [0.0, 1.0, 2.0, 3.0])
    for _ in range(3):
        trainer.step("p", [group])
    ref = ArtifactStore(tmp_path).put_adapter(trainer.adapter_state("p"),
                                              adapter_config(LORA, str(tiny_model_dir)))
    base, _ = load_base_model(tiny_model_dir)
    ids = torch.tensor([prompt + completions[0]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_logits = peft.PeftModel.from_pretrained(base, ref.path)(input_ids=ids).logits
    trained = trainer.logits("p", ids)
    assert (peft_logits - trained).abs().max().item() < 1e-5
    assert (base_logits - trained).abs().max().item() > 1e-3  # the adapter matters


@pytest.mark.parametrize("case", [
    {"b.lora_B.weight": torch.randn(8, 2), "a.lora_A.weight": torch.randn(2, 8)},
    {"layers.1.q": torch.randn(3, 3).double(), "layers.10.q": torch.randn(2).bfloat16(),
     "layers.1-x": torch.ones(2), "layers.1_x": torch.ones(2, 1), "x": torch.tensor(3.0),
     "empty": torch.zeros(0), "strided": torch.randn(4, 4).T},
    {"ünicode key": torch.ones(2), 'quo"te': torch.ones(1)},
    {},
])
def test_export_bytes_are_safetensors_own(case: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The fast writer must give the exact bytes safetensors does: they are the content id."""
    want = safetensors.torch.save({k: v.float().contiguous() for k, v in case.items()},
                                  metadata={"format": "pt"})
    assert serialize_tensors(case) == want
    if case:
        ref = ArtifactStore(tmp_path).put_adapter(case, {})
        assert (ref.path / WEIGHTS_FILE).read_bytes() == want
        assert ref.sha256 == hashlib.sha256(want).hexdigest() and ref.size_bytes == len(want)
