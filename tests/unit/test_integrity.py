"""Integrity and access: admin token on the engine's load/unload, no pickle anywhere, and no
adapter name or path that escapes the artifact store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from infra.settings import REPO_ROOT
from schemas.errors import PoisonEventError
from schemas.events import InteractionLogged
from tests.support.adapters import make_adapter
from workers.artifacts.store import ArtifactStore
from workers.serving.client import SGLangClient, SGLangError
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.server import ServerThread

TOKEN = "adm1n-t0ken"


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path) -> Iterator[ServerThread]:
    config = EngineConfig(base_path=tiny_model_dir, max_lora_rank=4, served_model_name="tiny")
    server = ServerThread(CpuEngine(config), admin_token=TOKEN).start()
    yield server
    server.stop()


def test_load_and_unload_require_the_admin_token(guarded: ServerThread, tiny_model_dir: Path,
                                                 tmp_path: Path) -> None:
    adapter = str(make_adapter(tiny_model_dir, tmp_path / "a"))
    for client in (SGLangClient(guarded.url), SGLangClient(guarded.url, api_key="wrong")):
        with pytest.raises(SGLangError) as refused:
            client.load_lora_adapter("a@1", adapter)
        assert refused.value.status == 401
        with pytest.raises(SGLangError) as refused:
            client.unload_lora_adapter("a@1")
        assert refused.value.status == 401
    admin = SGLangClient(guarded.url, api_key=TOKEN)
    assert admin.load_lora_adapter("a@1", adapter).success
    # Generation stays open to clients without the admin token.
    (out,) = SGLangClient(guarded.url).generate("hi", lora_path="a@1",
                                                sampling_params={"max_new_tokens": 2})
    assert out.text is not None
    assert admin.unload_lora_adapter("a@1").success


def test_the_sampler_refuses_an_adapter_that_fails_its_sha256(guarded: ServerThread,
                                                               tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from workers.serving.sampling import EngineSampler

    adapter = make_adapter(tiny_model_dir, tmp_path / "b")
    sampler = EngineSampler(SGLangClient(guarded.url, api_key=TOKEN),
                            AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    with pytest.raises(PoisonEventError, match="sha256"):
        sampler.ensure_adapter("b@1", adapter, verify=lambda: False)
    assert "b@1" not in {m["id"] for m in SGLangClient(guarded.url).models()}
    sampler.ensure_adapter("b@1", adapter, verify=lambda: True)
    assert "b@1" in {m["id"] for m in SGLangClient(guarded.url).models()}


# Anything that would unpickle (or pickle) on the wire or on disk.
PICKLE = re.compile(
    r"\bimport (pickle|cPickle|dill|cloudpickle|joblib)\b|\bfrom (pickle|dill|cloudpickle|joblib)"
    r"\b|\bpickle\.|(?<!safetensors\.)\btorch\.save\(|\ballow_pickle\s*=\s*True|\.to_pickle\(|\bread_pickle\(")
TORCH_LOAD = re.compile(r"(?<!safetensors\.)\btorch\.load\(([^)]*)\)")


def test_nothing_is_pickled_on_the_wire_or_on_disk() -> None:
    offenders = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in (".venv", ".data", "build") or rel == Path(__file__).relative_to(
                REPO_ROOT):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{rel}: {m.group(0)}" for m in PICKLE.finditer(text)]
        offenders += [f"{rel}: {m.group(0)}" for m in TORCH_LOAD.finditer(text)
                      if "weights_only=True" not in m.group(1)]
    assert offenders == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "a@1", ".hidden", "", "x" * 65, "a\x00b",
                                 "..", "a b", "ü"])
def test_policy_ids_cannot_become_paths_or_serve_names(bad: str) -> None:
    with pytest.raises(ValidationError):
        InteractionLogged(policy_id=bad, prompt="hi?")


@pytest.mark.parametrize("bad", ["../" * 3 + "etc", "/etc/passwd", "0" * 63, "A" * 64,
                                 "0" * 63 + "/", "..", ""])
def test_artifact_ids_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(PoisonEventError):
        store.adapter_path(bad)
    with pytest.raises(PoisonEventError):
        store.verify(bad)


@pytest.mark.parametrize("policy", ["../evil", "a/b", ".."])
def test_staging_refuses_a_policy_that_would_escape(tmp_path: Path, policy: str) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(PoisonEventError):
        store.stage(policy, 1, {"w": torch.zeros(1)})
    assert not any((tmp_path / "artifacts").parent.glob("evil*"))


def test_the_pickle_scan_catches_what_it_looks_for() -> None:
    assert PICKLE.search("import pickle") and PICKLE.search("x = torch.save(m, f)")
    assert not PICKLE.search("safetensors.torch.save(tensors)")
    assert [m.group(1) for m in TORCH_LOAD.finditer("torch.load(f)")] == ["f"]
