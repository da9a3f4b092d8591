"""The step journal: a step's checkpoint, consumed ids and output become durable together, a
restarted trainer resumes from it exactly, and a redelivered batch is split into the recorded
output and the events still to train."""

from __future__ import annotations

from pathlib import Path

import torch

from schemas.events import InteractionLogged, PolicyUpdated
from workers.models.base import LoraSpec
from workers.pipeline.journal import JOURNAL_FILE, StepJournal
from workers.training.grpo import TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer

LORA = LoraSpec(rank=4, alpha=8.0)
GROUP = TrainGroup(prompt_ids=[5, 6, 7], completions=[[8, 9], [10]],
                   old_logprobs=[[-1.0, -1.2], [-0.5]], rewards=[1.0, 0.0])


def _ev(event_id: str) -> InteractionLogged:
    """An event for `replay` (which reads only its id)."""
    return InteractionLogged(event_id=event_id, policy_id="p", prompt="q?")


def _output(step: int) -> PolicyUpdated:
    return PolicyUpdated(event_id=f"up-{step}", policy_id="p", step=step, loss=0.1,
                         mean_reward=0.5, tokens=3)


def test_commit_restore_and_replay(tiny_model_dir: Path, tmp_path: Path) -> None:
    journal = StepJournal(tmp_path / "journal", keep=2)
    trainer = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    for step, ids in ((1, ["a"]), (2, ["b", "c"]), (3, ["d"])):
        assert trainer.step("p", [GROUP]).step == step
        journal.commit("p", trainer, _output(step), ids)
    assert [p.name for p in sorted((tmp_path / "journal" / "p").iterdir())] == [
        f"{2:012d}", f"{3:012d}"]  # older steps pruned

    # A crash mid-commit leaves only an invisible temporary directory.
    partial = tmp_path / "journal" / "p" / ".tmp.crashed"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"half")
    entry = journal.latest("p")
    assert entry is not None and entry.step == 3 and entry.event_ids == {"d"}

    restarted = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    assert journal.restore("p", restarted) == 3 and restarted.steps_done("p") == 3
    for name, tensor in trainer.adapter_state("p").items():
        assert torch.equal(tensor, restarted.adapter_state("p")[name])
    # Both continue identically: the optimizer moments came back too.
    assert trainer.step("p", [GROUP]).loss == restarted.step("p", [GROUP]).loss

    replayed, fresh = journal.replay("p", [_ev("d"), _ev("e")])
    assert replayed is not None and (replayed.event_id, replayed.step) == ("up-3", 3)
    assert [e.event_id for e in fresh] == ["e"]
    replayed, fresh = journal.replay("p", [_ev("e")])
    assert replayed is None and len(fresh) == 1
    assert journal.replay("q", [_ev("x")])[0] is None
    assert journal.restore("q", restarted) is None


def test_a_step_without_its_journal_file_is_not_durable(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    journal = StepJournal(tmp_path / "journal")
    trainer = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    trainer.step("p", [GROUP])
    final = journal.commit("p", trainer, _output(1), ["a"])
    (final / JOURNAL_FILE).unlink()
    assert journal.latest("p") is None
