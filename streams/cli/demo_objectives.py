"""The demo's logs for `--objective sft` and `--objective dpo`: three policies each, trained on
logs that suit the objective, evaluated like the GRPO demo's (held-out reward of samples).

- sft: `terse` imitates empty answers, `yes` a reference answer ('yes yes'), `fan` the
  responses its user rated positively ('ZZZZZ');
- dpo: `terse` prefers an empty answer to a rambling one, `yes` 'yes yes' to 'no', and `fan`
  learns from pairs the pipeline makes itself: two logged responses to one prompt with
  different ratings ('ZZZZZ' liked, 'aaaa' disliked).

Each policy is created with `lorastream policy create`'s SDK call first (its objective, and its
own rank, learning rate and DPO knobs), so the logs themselves need not say how to train. Two
DPO policies add the chosen answers' NLL to DPO's loss (RPO, `dpo_sft_weight`): DPO alone may
make both answers less likely and drift in what it samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infra.settings import Settings
from schemas.events import InteractionLogged

HELD_OUT: dict[str, dict[str, Any]] = {
    "terse": {"task": "length", "task_params": {"target_chars": 0}},
    "yes": {"task": "reference", "reference": "yes yes"},
    "fan": {"task": "feedback", "response": "ZZZZZ", "feedback": 1.0},
}
"""How each policy's held-out prompts are scored: the same rewards as the GRPO demo."""

TRAIN: dict[str, dict[str, list[dict[str, Any]]]] = {
    "sft": {
        "terse": [{"reference": ""}],
        "yes": [{"reference": "yes yes"}],
        "fan": [{"response": "ZZZZZ", "feedback": 1.0}],
    },
    "dpo": {
        "terse": [{"chosen": "", "rejected": "well, let me think about it"}],
        "yes": [{"chosen": "yes yes", "rejected": "no"}],
        "fan": [{"response": "ZZZZZ", "feedback": 1.0}, {"response": "aaaa", "feedback": -1.0}],
    },
}
"""Each training prompt's log(s); `fan`'s two dpo logs share a prompt and become one pair."""

PREFERS = {
    "sft": {"terse": "empty answers (sft on '')", "yes": "'yes yes' (sft on a reference)",
            "fan": "what the user liked: 'ZZZZZ' (sft on rated responses)"},
    "dpo": {"terse": "'' over a rambling answer (dpo)",
            "yes": "'yes yes' over 'no' (dpo + nll of chosen)",
            "fan": "'ZZZZZ' liked over 'aaaa' disliked, paired by the pipeline (dpo + nll)"},
}
CONFIG: dict[str, dict[str, dict[str, Any]]] = {
    "sft": {"terse": {"rank": 2, "learning_rate": 1e-2}, "yes": {"rank": 4},
            "fan": {"rank": 4, "learning_rate": 5e-3}},
    "dpo": {"terse": {"rank": 2}, "yes": {"rank": 4, "dpo_beta": 0.2, "dpo_sft_weight": 1.0},
            "fan": {"rank": 4, "dpo_sft_weight": 1.0}},
}
"""Each policy's own configuration (the rest: the pipeline's settings)."""


def objective_interactions(objective: str, steps: int, heldout: int,
                           prompt: Callable[[int], str],
                           heldout_prompt: Callable[[int], str]) -> list[InteractionLogged]:
    """Held-out prompts first, then `steps` training prompts per policy, round-robin."""
    out = [InteractionLogged(policy_id=p, prompt=heldout_prompt(i), split="eval", **spec)
           for p, spec in HELD_OUT.items() for i in range(heldout)]
    for i in range(steps):
        for policy, logs in TRAIN[objective].items():
            out += [InteractionLogged(policy_id=policy, prompt=prompt(i), **log)
                    for log in logs]
    return out


def create_policies(settings: Settings, objective: str) -> None:
    from streams.sdk.policies import create_policy

    for policy, config in CONFIG[objective].items():
        create_policy(settings, policy, objective=objective, **config)  # type: ignore[arg-type]
