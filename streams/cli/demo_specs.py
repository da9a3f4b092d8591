"""What each `lorastream demo` trains: the tiny bases (`--arch`) and SmolLM2 (`--model smollm2`).

A spec names the base to build, three policies with their reward tasks, the prompts, and the
pipeline knobs it runs with. The tiny bases are random, so their tasks are about shape (length,
a reference string, what a user liked); SmolLM2-135M-Instruct is a real chat model, so its tasks
change what it says in a way a person can read: shorter answers, answers in capitals, answers
that open with "Sure!". Its prompts go through the model's chat template (the pipeline renders
them), and the demo ends with one held-out answer per policy before and after training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = ["cat", "sun", "map", "key", "red", "box", "sky", "tea", "owl", "pen", "ice", "jam"]
QUESTIONS = [
    "What is the capital of France?", "Name a fruit.", "Why is the sky blue?",
    "What do cats eat?", "How many legs does a spider have?", "What is rain?",
    "Who wrote Hamlet?", "What color is grass?", "What is a river?", "Why do birds sing?",
    "What is bread made of?", "What is the moon?", "How do plants grow?", "What is snow?",
    "What is music?", "Why do we sleep?",
]
HELDOUT_QUESTIONS = ["What is the sun?", "What do dogs like?", "What is a forest?",
                     "Why is the sea salty?", "What is a cloud?", "Why do leaves fall?",
                     "What is a mountain?", "What do bees make?"]
"""Eight, so the held-out set splits into a selection and a test set of distinct questions."""


@dataclass(frozen=True)
class DemoSpec:
    """One demo: its base, policies (task fields of their interactions), prompts and knobs."""

    name: str
    build: Callable[[Path], Path]
    """Builds (once) the base under the data dir's `models/` and returns its directory."""
    policies: dict[str, dict[str, Any]]
    prefers: dict[str, str]
    prompt: Callable[[int], str]
    heldout: Callable[[int], str]
    steps: int
    settings: dict[str, Any] = field(default_factory=dict)
    answers: bool = False
    """End with each policy's greedy held-out answer, before and after."""


def _tiny(arch: str) -> Callable[[Path], Path]:
    def build(models: Path) -> Path:
        if arch == "llama":
            from workers.models.base import build_tiny_model

            return build_tiny_model(models / "tiny-llama")
        from workers.models.tiny import build_tiny

        return build_tiny(arch, models / f"tiny-{arch}")

    return build


def _smollm2(models: Path) -> Path:
    from workers.models.smollm2 import smollm2_dir

    return smollm2_dir(models / "smollm2-135m")


TINY_POLICIES: dict[str, dict[str, Any]] = {
    "terse": {"task": "length", "task_params": {"target_chars": 0}},
    "yes": {"task": "reference", "reference": "yes yes"},
    "fan": {"task": "feedback", "response": "ZZZZZ", "feedback": 1.0},
}
TINY_PREFERS = {
    "terse": "short answers (length)",
    "yes": "answers like 'yes yes' (reference)",
    "fan": "what the user liked: 'ZZZZZ' (feedback)",
}
SMOL_POLICIES: dict[str, dict[str, Any]] = {
    "brief": {"task": "length", "task_params": {"target_chars": 12}},
    "shout": {"task": "length", "task_params": {"target_chars": 32, "charset": "upper"}},
    "sure": {"task": "reference", "reference": "Sure!"},
}
SMOL_PREFERS = {
    "brief": "answers of ~12 chars (length)",
    "shout": "ANSWERS IN CAPITALS (length+charset)",
    "sure": "answers like 'Sure!' (reference)",
}


def tiny_spec(arch: str) -> DemoSpec:
    return DemoSpec(
        name=f"tiny {arch}", build=_tiny(arch), policies=TINY_POLICIES, prefers=TINY_PREFERS,
        prompt=lambda i: f"{WORDS[i % len(WORDS)]} {i}?",
        heldout=lambda i: f"{WORDS[(1000 + i) % len(WORDS)]} {1000 + i}?", steps=128)


SMOLLM2 = DemoSpec(
    name="SmolLM2-135M-Instruct", build=_smollm2, policies=SMOL_POLICIES,
    prefers=SMOL_PREFERS, prompt=lambda i: QUESTIONS[i % len(QUESTIONS)],
    heldout=lambda i: HELDOUT_QUESTIONS[i % len(HELDOUT_QUESTIONS)], steps=32,
    settings={"max_new_tokens": 16, "learning_rate": 4e-3, "lora_rank": 4, "lora_alpha": 8.0,
              "export_every": 4},
    answers=True)
