from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from workers.models.base import LoraSpec, load_base_model
from workers.reference.sampler import LocalEngine, Sample

PROMPTS = ["Hi", "What is 2+2?", "x"]  # different lengths: exercises left padding
T = 0.7


def export_random_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT adapter dir with non-zero B, written by PEFT itself."""
    base, _ = load_base_model(base_dir)
    model = peft.get_peft_model(base, LoraSpec().peft_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [export_random_adapter(tiny_model_dir, root / f"a{i}", i) for i in range(3)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapter_dirs: list[Path]) -> LocalEngine:
    eng = LocalEngine(tiny_model_dir)
    eng.load_adapter("a0", adapter_dirs[0])
    return eng


def teacher_forced(engine: LocalEngine, adapter: str | None, prompt: str, s: Sample) -> list[float]:
    ids = torch.tensor([engine.encode(prompt) + s.token_ids])
    model = engine.model
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
        else:
            model.set_adapter(engine._adapters[adapter])
            logits = model(input_ids=ids).logits
    lp = torch.log_softmax(logits[0, :-1] / T, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[-len(s.token_ids):].tolist()


@pytest.mark.parametrize("adapter", [None, "a0"])
def test_logprobs_match_teacher_forcing(engine: LocalEngine, adapter: str | None) -> None:
    groups = engine.generate(PROMPTS, adapter, n=4, max_new_tokens=8, temperature=T, seed=3)
    assert [len(g) for g in groups] == [4, 4, 4]
    eos = engine.tokenizer.eos_token_id
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for s in group:
            assert 1 <= len(s.token_ids) == len(s.logprobs) <= 8
            assert s.finished == (s.token_ids[-1] == eos)
            assert eos not in s.token_ids[:-1]
            expected = teacher_forced(engine, adapter, prompt, s)
            assert s.logprobs == pytest.approx(expected, abs=1e-4)


def test_completion_lengths_vary(engine: LocalEngine) -> None:
    groups = engine.generate(PROMPTS, None, n=8, max_new_tokens=8, seed=0)
    samples = [s for g in groups for s in g]
    assert any(s.finished for s in samples)
    assert len({len(s.token_ids) for s in samples}) > 2


def test_seed_determinism(engine: LocalEngine) -> None:
    a = engine.generate(PROMPTS, "a0", n=3, max_new_tokens=8, seed=7)
    b = engine.generate(PROMPTS, "a0", n=3, max_new_tokens=8, seed=7)
    c = engine.generate(PROMPTS, "a0", n=3, max_new_tokens=8, seed=8)
    assert a == b
    assert a != c


def test_greedy_is_deterministic_without_seed(engine: LocalEngine) -> None:
    a = engine.generate(["Hi"], None, n=2, max_new_tokens=6, greedy=True)
    first, second = a[0]
    assert first.token_ids == second.token_ids
    assert first.logprobs == pytest.approx(second.logprobs, abs=1e-5)  # rows of one batch


def test_adapter_changes_logprobs(engine: LocalEngine) -> None:
    s = engine.generate(["Hello"], "a0", n=1, max_new_tokens=8, temperature=T, seed=1)[0][0]
    base = teacher_forced(engine, None, "Hello", s)
    assert max(abs(x - y) for x, y in zip(s.logprobs, base, strict=True)) > 1e-2


def test_unload_and_lru(tiny_model_dir: Path, adapter_dirs: list[Path]) -> None:
    eng = LocalEngine(tiny_model_dir, max_loaded=2)
    before = eng.generate(PROMPTS, None, n=2, max_new_tokens=8, seed=5)
    eng.load_adapter("a", adapter_dirs[0])
    eng.load_adapter("b", adapter_dirs[1])
    eng.load_adapter("a", adapter_dirs[0])  # idempotent; marks 'a' as recently used
    eng.load_adapter("c", adapter_dirs[2])  # evicts 'b', the least recently used
    assert eng.loaded_adapters() == ["a", "c"]
    with pytest.raises(KeyError):
        eng.generate(["Hi"], "b", n=1, max_new_tokens=2)
    eng.unload_adapter("a")
    eng.unload_adapter("c")
    assert eng.loaded_adapters() == []
    with pytest.raises(KeyError):
        eng.unload_adapter("a")
    assert eng.generate(PROMPTS, None, n=2, max_new_tokens=8, seed=5) == before
