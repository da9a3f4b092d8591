"""Follow a pipeline's output topics and keep per-policy progress (demo, tests, ops).

Reads without a consumer group (assigned partitions, from the beginning), so following never
disturbs the pipeline's own consumers.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from infra.settings import Settings
from streams.sdk.producer import kafka_client_config

FOLLOWED = ("updates", "exports", "evaluations", "promotions", "dead-letters")


@dataclass
class PolicyProgress:
    steps: int = 0
    trained: int = 0
    """Rollout groups consumed by the trainer (a step trains on one or more groups)."""
    train_rewards: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    sampled: bool = False
    """Any step trained on sampled (grpo) groups: else its rewards are only labels."""
    exported: set[int] = field(default_factory=set)
    evaluated: dict[int, dict[str, Any]] = field(default_factory=dict)
    promoted: dict[int, float] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    """Passing revisions the promote stage refused (a better one serves by then)."""
    promoted_paths: dict[int, str] = field(default_factory=dict)
    dead_letters: int = 0
    """Dead letters of the stages up to the trainer (interactions that will not train)."""

    @property
    def reward_before(self) -> float | None:
        first = [e for e in self.evaluated.values() if e["baseline_revision"] == 0]
        return min(first, key=lambda e: e["revision"])["baseline_score"] if first else None

    @property
    def serving(self) -> int:
        return max(self.promoted, default=0)

    @property
    def serving_path(self) -> str | None:
        """The artifact directory of the revision serving now (None: the base)."""
        return self.promoted_paths.get(self.serving)

    @property
    def reward_after(self) -> float | None:
        return self.promoted[self.serving] if self.promoted else self.reward_before

    def settled(self, interactions: int, export_every: int) -> bool:
        """Every interaction trained on (or dead-lettered), every revision that the trainer's
        steps imply evaluated, every passing revision promoted."""
        passed = {r for r, e in self.evaluated.items() if e["passed"]}
        return (
            self.trained + self.dead_letters >= interactions
            and len(self.evaluated) >= self.steps // export_every
            and passed <= set(self.promoted) | self.refused
        )


class PipelineFollower:
    def __init__(self, settings: Settings, policies: list[str], *, interactions: int) -> None:
        self.settings = settings
        self.interactions = interactions
        self.progress = {p: PolicyProgress() for p in policies}

    def follow(self, timeout_s: float, *, on_progress: Callable[[str], None],
               alive: Callable[[], bool] = lambda: True) -> bool:
        """Consume until every policy settled (True) or timeout / dead worker (False)."""
        consumer = self._consumer()
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        try:
            while time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=250).values():
                    for rec in records:
                        self._apply(rec.topic, rec.value)
                if self.done():
                    on_progress(self.line())
                    return True
                if not alive():
                    on_progress("the worker exited early")
                    return False
                if time.monotonic() - last_report > 3.0:
                    on_progress(self.line())
                    last_report = time.monotonic()
        finally:
            consumer.close()
        on_progress(f"timed out after {timeout_s:.0f}s: {self.line()}")
        return False

    def _consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(**kafka_client_config(self.settings), enable_auto_commit=False)
        parts = []
        for name in FOLLOWED:
            topic = self.settings.topic(name)
            parts += [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        return consumer

    def _apply(self, topic: str, value: bytes) -> None:
        event = orjson.loads(value)
        prog = self.progress.get(event.get("policy_id") or "")
        if prog is None:
            return
        kind = topic.removeprefix(self.settings.topic_prefix)
        if kind == "updates":
            prog.steps = max(prog.steps, event["step"])
            prog.trained += len(event["rollout_ids"])
            prog.train_rewards.append(event["mean_reward"])
            prog.train_losses.append(event["loss"])
            prog.sampled |= "grpo" in (event.get("objectives") or {"grpo": 1})
        elif kind == "exports":
            prog.exported.add(event["revision"])
        elif kind == "evaluations":
            prog.evaluated[event["revision"]] = event
        elif kind == "promotions":
            prog.promoted[event["revision"]] = event["score"]
            prog.promoted_paths[event["revision"]] = event["path"]
        elif kind == "dead-letters":
            if event.get("stage") == "promote":
                prog.refused.add(_revision_of(event))
            else:
                prog.dead_letters += 1

    def done(self) -> bool:
        every = self.settings.export_every
        return all(p.settled(self.interactions, every) for p in self.progress.values())

    def line(self) -> str:
        parts = [
            f"{pid}: trained {p.trained}/{self.interactions} step {p.steps} "
            f"exported {len(p.exported)} "
            f"evaluated {len(p.evaluated)} serving r{p.serving}"
            for pid, p in self.progress.items()
        ]
        return " | ".join(parts)

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "policies": [
                {
                    "policy_id": pid,
                    "revisions": len(p.exported),
                    "promoted": len(p.promoted),
                    "reward_before": _round(p.reward_before),
                    "reward_after": _round(p.reward_after),
                }
                for pid, p in self.progress.items()
            ],
            "seconds": round(seconds, 1),
        }

    def table(self, prefers: dict[str, str]) -> str:
        head = ("policy", "prefers", "groups", "steps", "exported", "evaluated", "promoted",
                "serving", "reward before", "reward after",
                "train reward (sft/dpo: loss) first→last 3 steps")
        rows = [head]
        for pid, p in self.progress.items():
            tr = p.train_rewards if p.sampled else p.train_losses
            trend = (f"{_mean(tr[:3]):.3f}→{_mean(tr[-3:]):.3f}" if tr else "-")
            rows.append((pid, prefers.get(pid, ""), str(p.trained), str(p.steps),
                         str(len(p.exported)),
                         str(len(p.evaluated)), str(len(p.promoted)), f"r{p.serving}",
                         _fmt(p.reward_before), _fmt(p.reward_after), trend))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _revision_of(letter: dict[str, Any]) -> int:
    """The revision of a dead-lettered evaluation (-1 when its bytes are not one)."""
    try:
        return int(orjson.loads(base64.b64decode(letter["original_b64"]))["revision"])
    except (ValueError, KeyError, TypeError):
        return -1


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
