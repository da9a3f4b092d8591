"""The artifact store shared through a real S3-compatible server (SeaweedFS on loopback): hosts
with separate local caches exchange revisions, staged checkpoints and the step journal through
the bucket; a revision enters a cache only if it hashes to its address."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infra.settings import Settings
from schemas.events import PolicyUpdated
from workers.artifacts.remote import RemoteFiles
from workers.artifacts.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactCorrupt,
    ArtifactStore,
    adapter_config,
)
from workers.models.base import LoraSpec
from workers.pipeline.journal import RedisHeads, StepJournal
from workers.pipeline.state import PolicyState
from workers.training.grpo import TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer

LORA = LoraSpec(rank=4, alpha=8.0)
GROUP = TrainGroup(prompt_ids=[5, 6, 7], completions=[[8, 9], [10]],
                   old_logprobs=[[-1.0, -1.2], [-0.5]], rewards=[1.0, 0.0])


def _host(s3: Settings, tmp_path: Path, name: str) -> ArtifactStore:
    """One host's store: its own local cache, the shared bucket."""
    return ArtifactStore.for_settings(s3.model_copy(update={"artifact_dir": tmp_path / name}))


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.randn(4, 16, generator=gen),
            "x.lora_B.weight": torch.randn(16, 4, generator=gen)}


def test_a_revision_written_on_one_host_loads_on_another(s3_settings: Settings,
                                                         tmp_path: Path) -> None:
    a, b = _host(s3_settings, tmp_path, "a"), _host(s3_settings, tmp_path, "b")
    ref = a.put_adapter(_tensors(1), adapter_config(LORA, "base"))
    assert a.location(ref.path) == f"{s3_settings.artifact_url}/adapters/{ref.sha256}"
    assert not (tmp_path / "b" / "adapters" / ref.sha256).exists()
    assert b.verify(ref.sha256)  # fetched into b's cache, hashed
    path = b.adapter_path(ref.sha256)
    assert path == tmp_path / "b" / "adapters" / ref.sha256
    assert (path / WEIGHTS_FILE).read_bytes() == (ref.path / WEIGHTS_FILE).read_bytes()
    assert a.put_adapter(_tensors(1), adapter_config(LORA, "base")).sha256 == ref.sha256

    staged = a.stage("alice", 4, _tensors(2), tag="t1")
    location = a.location(staged)
    assert location.startswith("s3://") and location.endswith("staging/alice/4-t1.safetensors")
    got = b.load_staged(location)
    assert all(torch.equal(got[k], v) for k, v in _tensors(2).items())
    a.discard_staged(location)
    with pytest.raises(FileNotFoundError):
        _host(s3_settings, tmp_path, "c").load_staged(location)


def test_a_tampered_object_never_enters_a_cache(s3_settings: Settings, tmp_path: Path) -> None:
    a = _host(s3_settings, tmp_path, "a")
    ref = a.put_adapter(_tensors(3), adapter_config(LORA, "base"))
    remote = a.remote
    assert isinstance(remote, RemoteFiles)
    remote.put_bytes(b"not the weights", f"adapters/{ref.sha256}/{WEIGHTS_FILE}")
    c = _host(s3_settings, tmp_path, "c")
    assert not c.verify(ref.sha256)
    with pytest.raises(ArtifactCorrupt):
        c.adapter_path(ref.sha256)
    assert not (tmp_path / "c" / "adapters" / ref.sha256).exists()
    assert not c.verify("0" * 64)  # absent everywhere
    assert remote.exists(f"adapters/{ref.sha256}/{CONFIG_FILE}")


def test_the_step_journal_resumes_on_another_host(s3_settings: Settings, tmp_path: Path,
                                                  tiny_model_dir: Path) -> None:
    """A policy trained on host a moves to host b: b restores the head step from the bucket
    (a's disk is out of its reach) and goes on exactly as a would have."""
    heads = RedisHeads(PolicyState(s3_settings).r, PolicyState(s3_settings).keys)
    a, b = _host(s3_settings, tmp_path, "a"), _host(s3_settings, tmp_path, "b")
    on_a = StepJournal(a.root / "journal", heads, remote=a.remote)
    on_b = StepJournal(b.root / "journal", heads, remote=b.remote)
    trainer_a = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    for step in (1, 2):
        trainer_a.step("p", [GROUP])
        on_a.commit("p", trainer_a, PolicyUpdated(policy_id="p", step=step, loss=0.0,
                                                  mean_reward=0.0, tokens=1), [f"e{step}"])
    trainer_b = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    assert on_b.restore("p", trainer_b) == 2
    entry = on_b.latest("p")
    assert entry is not None and entry.event_ids == {"e2"}
    assert trainer_a.step("p", [GROUP]).loss == trainer_b.step("p", [GROUP]).loss
