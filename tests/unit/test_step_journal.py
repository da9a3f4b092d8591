"""The step journal: a step's checkpoint, consumed ids and output become durable together, a
restarted trainer resumes from it exactly, a redelivered batch is split into the recorded
output and the events still to train, and the fence refuses a step computed from a state that
is no longer the newest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.events import InteractionLogged, PolicyUpdated
from workers.models.base import LoraSpec
from workers.pipeline.journal import JOURNAL_FILE, StaleStep, StepJournal, step_of
from workers.training.grpo import TrainGroup
from workers.training.multitrainer import MultiPolicyTrainer

LORA = LoraSpec(rank=4, alpha=8.0)
GROUP = TrainGroup(prompt_ids=[5, 6, 7], completions=[[8, 9], [10]],
                   old_logprobs=[[-1.0, -1.2], [-0.5]], rewards=[1.0, 0.0])


class MemoryHeads:
    """The journal's heads in a dict, with the same compare-and-set as the Redis ones."""

    def __init__(self) -> None:
        self.heads: dict[str, str] = {}

    def get(self, policy_id: str) -> str | None:
        return self.heads.get(policy_id)

    def advance(self, policy_id: str, from_step: int, entry: str) -> tuple[bool, str | None]:
        cur = self.heads.get(policy_id)
        if step_of(cur) != from_step:
            return False, cur
        self.heads[policy_id] = entry
        return True, entry

    def seed(self, policy_id: str, entry: str) -> None:
        self.heads.setdefault(policy_id, entry)


def _ev(event_id: str) -> InteractionLogged:
    """An event for `replay` (which reads only its id)."""
    return InteractionLogged(event_id=event_id, policy_id="p", prompt="q?")


def _output(step: int) -> PolicyUpdated:
    return PolicyUpdated(event_id=f"up-{step}", policy_id="p", step=step, loss=0.1,
                         mean_reward=0.5, tokens=3)


def test_commit_restore_and_replay(tiny_model_dir: Path, tmp_path: Path) -> None:
    journal = StepJournal(tmp_path / "journal", MemoryHeads(), keep=2)
    trainer = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    for step, ids in ((1, ["a"]), (2, ["b", "c"]), (3, ["d"])):
        assert trainer.step("p", [GROUP]).step == step
        journal.commit("p", trainer, _output(step), ids)
    kept = sorted(p.name for p in (tmp_path / "journal" / "p").iterdir())
    assert [step_of(n) for n in kept] == [2, 3]  # older steps pruned

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


def test_two_workers_cannot_both_advance_a_policy(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Both hold the policy at step 1; the first to commit step 2 wins, the other's step 2 is
    refused and leaves nothing behind; reloaded from the head, it goes on from step 2."""
    heads = MemoryHeads()
    journal = StepJournal(tmp_path / "journal", heads)
    first = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    first.step("p", [GROUP])
    journal.commit("p", first, _output(1), ["a"])
    second = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    assert journal.restore("p", second) == 1

    first.step("p", [GROUP])
    won = journal.commit("p", first, _output(2), ["b"])
    second.step("p", [GROUP])
    with pytest.raises(StaleStep, match="computed from step 1, but its newest step is 2"):
        journal.commit("p", second, _output(2), ["b2"])
    assert heads.get("p") == won.name
    assert sorted(step_of(p.name) for p in won.parent.iterdir()) == [1, 2]
    latest = journal.latest("p")
    assert latest is not None and latest.event_ids == {"b"}

    second.drop_policy("p")
    assert journal.restore("p", second) == 2
    second.step("p", [GROUP])
    journal.commit("p", second, _output(3), ["c"])
    assert step_of(heads.get("p")) == 3


def test_a_lost_head_is_found_again_on_storage(tiny_model_dir: Path, tmp_path: Path) -> None:
    journal = StepJournal(tmp_path / "journal", MemoryHeads())
    trainer = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    for step in (1, 2):
        trainer.step("p", [GROUP])
        journal.commit("p", trainer, _output(step), [f"e{step}"])
    flushed = StepJournal(tmp_path / "journal", MemoryHeads())  # Redis lost the heads
    assert step_of(flushed.head("p")) == 2


def test_a_step_without_its_journal_file_is_not_durable(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    journal = StepJournal(tmp_path / "journal", MemoryHeads())
    trainer = MultiPolicyTrainer(tiny_model_dir, LORA, lr=1e-2)
    trainer.step("p", [GROUP])
    final = journal.commit("p", trainer, _output(1), ["a"])
    (final / JOURNAL_FILE).unlink()
    assert StepJournal(tmp_path / "journal", MemoryHeads()).latest("p") is None
