"""The pipeline's events, v1.

Every event carries `event_id`, `schema_version`, `policy_id` and `ts`. Events of later stages
nest the event that caused them, so a consumer of any stage can trace a result back to the
interaction log that produced it without a lookup.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
"""What this reader can decode; anything else is dead-lettered with the reason, never read as
if it were version 1."""
MAX_PROMPT_CHARS = 8192
MAX_MESSAGES = 64

PolicyId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"),
]
"""Policy ids become Redis keys, serve names and artifact paths: no path characters."""

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

Objective = Literal["grpo", "sft", "dpo"]
"""How a policy learns from a log: `workers/training/objectives.py`."""


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields shared by every event."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    event_id: str = Field(
        default_factory=new_event_id, min_length=1, max_length=128,
        description="Optional on the wire. A stage reading an event without one derives it "
                    "from the record's Kafka coordinates (topic, partition, offset), so a "
                    "redelivery of the same record has the same id; a producer that may "
                    "retry a send should set it itself.")
    schema_version: int = Field(
        default=SCHEMA_VERSION,
        json_schema_extra={"enum": list[JsonValue](sorted(SUPPORTED_SCHEMA_VERSIONS))},
        description="Version of this event's schema; other versions are dead-lettered.")
    policy_id: PolicyId
    ts: float = Field(default_factory=time.time,
                      description="Unix seconds; the reader's clock when absent.")

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, version: int) -> int:
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {version} (this reader takes "
                             f"{sorted(SUPPORTED_SCHEMA_VERSIONS)})")
        return version


class ChatMessage(BaseModel):
    """One turn of an OpenAI-format conversation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class InteractionLogged(Event):
    """One logged interaction, pushed by a producer.

    `task` names the reward function (`reference`, `length`, `feedback`); `split="eval"`
    adds the prompt to the policy's held-out set instead of training on it. `messages` (OpenAI
    chat format, ending with a user turn) is what the model is prompted with when given; the
    base's chat template renders it (`workers.models.chat`). `prompt` is then filled from the
    last user turn if absent, so readers that know only `prompt` still read a valid v1 event
    (an additive field: `schema_version` stays 1).
    """

    kind: Literal["interaction_logged"] = "interaction_logged"
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               max_length=MAX_MESSAGES)
    task: str = Field(default="reference", min_length=1, max_length=64)
    reference: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    response: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    feedback: float | None = Field(default=None, ge=-1.0, le=1.0)
    task_params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    split: Literal["train", "eval"] = "train"
    user_id: str | None = Field(default=None, max_length=128)
    served_revision: int | None = Field(default=None, ge=0)
    """Set on feedback from production (the gateway): the revision that gave `response`."""
    answer_id: str | None = Field(default=None, max_length=128)
    """The gateway's id of the answer this feedback is about."""
    objective: Objective | None = None
    """`grpo`: sampled and rewarded; `sft`: the `reference`, `chosen`, or a `response` with
    positive feedback is the target; `dpo`: `chosen` over `rejected`, or two logged responses
    to one prompt with different feedback. None: the policy's configured objective (grpo
    unless `lorastream policy create --objective` said otherwise)."""
    chosen: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    rejected: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    """A preference pair (both or neither): `chosen` is the better answer to `prompt`."""

    @model_validator(mode="after")
    def _pair(self) -> InteractionLogged:
        if (self.chosen is None) != (self.rejected is None):
            raise ValueError("chosen and rejected come together (a preference pair)")
        if self.chosen is not None and self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same answer")
        return self

    @model_validator(mode="before")
    @classmethod
    def _prompt_from_messages(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("prompt") and data.get("messages"):
            last = data["messages"][-1]
            content = last.get("content") if isinstance(last, dict) else None
            if isinstance(content, str) and content:
                data = {**data, "prompt": content}
        return data

    @model_validator(mode="after")
    def _ends_with_user(self) -> InteractionLogged:
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("messages must end with a user turn (the model answers it)")
        return self

    def chat(self) -> list[dict[str, str]] | None:
        """`messages` as plain dicts (what a chat template takes), or None."""
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.content} for m in self.messages]


class Completion(BaseModel):
    """One sampled completion with the sampler's per-token log-probs (the GRPO `old` term)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool = True


class RolloutGenerated(Event):
    """A group of G completions for one interaction, sampled from `revision` (0 = base)."""

    kind: Literal["rollout_generated"] = "rollout_generated"
    interaction: InteractionLogged
    revision: int = Field(ge=0)
    prompt_ids: list[int]
    completions: list[Completion] = Field(min_length=1)
    temperature: float = Field(gt=0.0)
    objective: Objective = "grpo"
    """`grpo`: sampled. `sft`: the completion is the logged target; `dpo`: the logged pair,
    chosen then rejected. Neither is sampled (revision 0, log-probs unused)."""
    partner: InteractionLogged | None = None
    """A dpo pair made of two logged responses: the other interaction of the pair."""


class RolloutRewarded(Event):
    """A rollout group with one finite reward per completion."""

    kind: Literal["rollout_rewarded"] = "rollout_rewarded"
    rollout: RolloutGenerated
    rewards: list[float] = Field(min_length=1)
    reward_fn: str
    reward_version: int = 1


class SourcePosition(BaseModel):
    """Where a stage read its input: the exact Kafka message (for provenance)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class PolicyUpdated(Event):
    """One GRPO step applied to a policy's adapter."""

    kind: Literal["policy_updated"] = "policy_updated"
    step: int = Field(ge=1)
    loss: float
    mean_reward: float
    kl: float = 0.0
    grad_norm: float = 0.0
    tokens: int = Field(ge=0)
    rollout_ids: list[str] = Field(default_factory=list)
    checkpoint: str | None = None
    """Set on steps that should become a revision: where the trainer staged the adapter."""
    sources: list[SourcePosition] = Field(default_factory=list)
    """The rewards messages this step trained on (provenance of the revision it ends up in)."""
    reward_fns: dict[str, int] = Field(default_factory=dict)
    """Reward function name → version, of the groups this step trained on."""
    objectives: dict[str, int] = Field(default_factory=dict)
    """Objective → how many of this step's groups trained with it."""
    config_id: str | None = Field(default=None, max_length=64)
    """The policy configuration this step used (`workers/pipeline/configs.py`)."""
    config: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    """Its values: objective, reward, learning rate, rank, alpha, targets, loss knobs."""


class AdapterExported(Event):
    """An adapter-only revision written to the artifact store (PEFT format)."""

    kind: Literal["adapter_exported"] = "adapter_exported"
    revision: int = Field(ge=1)
    step: int = Field(ge=1)
    parent_revision: int = Field(ge=0)
    sha256: Sha256
    path: str
    size_bytes: int = Field(ge=0)
    rank: int = Field(ge=1)
    alpha: float
    base_model: str


class AdapterEvaluated(Event):
    """A revision's held-out score next to the score of what serves now."""

    kind: Literal["adapter_evaluated"] = "adapter_evaluated"
    revision: int = Field(ge=1)
    sha256: Sha256
    path: str
    score: float
    """On the held-out test set: reported, never used to decide."""
    baseline_revision: int = Field(ge=0)
    baseline_score: float
    prompts: int = Field(ge=0)
    passed: bool
    reason: str = ""
    """Why it passed or not, for people reading the evaluations topic."""
    selection_score: float | None = None
    """On the held-out selection set: what the promotion gate compares (None: the same set as
    `score`, when there are too few held-out prompts to split)."""
    selection_baseline_score: float | None = None
    selection_prompts: int = Field(default=0, ge=0)


class PolicyPromoted(Event):
    """A revision became the policy's serving revision."""

    kind: Literal["policy_promoted"] = "policy_promoted"
    revision: int = Field(ge=1)
    previous_revision: int = Field(ge=0)
    score: float
    sha256: Sha256
    path: str
    serve_name: str


class PolicyRolledBack(Event):
    """Serving moved back to an earlier revision (0 = the base model)."""

    kind: Literal["policy_rolled_back"] = "policy_rolled_back"
    from_revision: int = Field(ge=0)
    to_revision: int = Field(ge=0)
    reason: str


class PolicyPaused(Event):
    """Training of a policy stopped after a rejected step (non-finite loss, exploding gradient).

    Published on `promotions`; while paused, the rollout and update stages dead-letter the
    policy's events with reason "policy paused" until an operator runs `lorastream resume`.
    """

    kind: Literal["policy_paused"] = "policy_paused"
    stage: str
    reason: str


class PolicyResumed(Event):
    """An operator lifted a pause (`lorastream resume`). Published on `promotions` after the
    pause it ends, so replaying that topic in order (a Redis rebuild does) gives the current
    pause state: the last of a policy's pause and resume events wins."""

    kind: Literal["policy_resumed"] = "policy_resumed"
    paused_reason: str | None = None


class AnswerServed(Event):
    """One answer the gateway served (a configurable sample of them), on the `served` topic.

    What operators and offline analysis need to tie production traffic to revisions: who
    answered (`revision`, `engine`), how fast (`latency_ms`, `ttft_ms`, `cold_wait_ms`) and how
    much (`prompt_tokens`, `completion_tokens`). Texts stay in the gateway's answer store (for
    feedback), not on this topic.
    """

    kind: Literal["answer_served"] = "answer_served"
    answer_id: str = Field(min_length=1, max_length=128)
    namespace: str = Field(default="default", max_length=128)
    revision: int = Field(ge=0)
    engine: str = Field(max_length=256)
    route: Literal["chat", "completion"]
    stream: bool = False
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    latency_ms: float = Field(ge=0.0)
    ttft_ms: float = Field(ge=0.0)
    cold_wait_ms: float = Field(default=0.0, ge=0.0)
    finish_reason: str = ""


class DeadLetter(BaseModel):
    """An event a stage could not process: why, where, and the original bytes.

    Not an `Event`: its policy may be unknown or invalid, which may be why it is here.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["dead_letter"] = "dead_letter"
    event_id: str = Field(default_factory=new_event_id)
    schema_version: int = SCHEMA_VERSION
    policy_id: str | None = None
    ts: float = Field(default_factory=time.time)
    stage: str
    error_type: str
    error: str
    retryable: bool = False
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    original_b64: str
    """The original value, base64-encoded: it may not be valid UTF-8 or JSON."""


EVENT_TYPES: dict[str, type[BaseModel]] = {
    "interaction_logged": InteractionLogged,
    "rollout_generated": RolloutGenerated,
    "rollout_rewarded": RolloutRewarded,
    "policy_updated": PolicyUpdated,
    "adapter_exported": AdapterExported,
    "adapter_evaluated": AdapterEvaluated,
    "policy_promoted": PolicyPromoted,
    "policy_rolled_back": PolicyRolledBack,
    "policy_paused": PolicyPaused,
    "policy_resumed": PolicyResumed,
    "answer_served": AnswerServed,
    "dead_letter": DeadLetter,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event, for producers in other languages."""
    return {name: model.model_json_schema() for name, model in EVENT_TYPES.items()}
