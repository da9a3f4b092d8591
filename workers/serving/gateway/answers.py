"""What the gateway answered, kept so that feedback can turn into training data.

Every answer gets an id (`chatcmpl-…` / `cmpl-…`, OpenAI's shapes). The answer store keeps, per
id and for `gateway_answer_ttl_s`, the policy, its namespace, the revision that answered, the
prompt and the response: feedback names only the id and a score, and becomes an
`InteractionLogged` (task `feedback`, or `reference` when the user gave a correction) keyed by
the policy, recording the revision that answered. An answer takes one feedback: a repeat of
the same feedback is the same event (its id derives from the answer's), a different one is
refused, because the pipeline would drop it as a duplicate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis

from infra.settings import Settings
from schemas.events import MAX_PROMPT_CHARS, InteractionLogged
from schemas.ids import derive_id
from workers.keys import RedisKeys


@dataclass(frozen=True)
class Answer:
    answer_id: str
    policy_id: str | None
    """None: the base model was asked for by name (no policy to train)."""
    namespace: str
    revision: int
    prompt: str
    response: str


def new_answer_id(route: str) -> str:
    return f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def prompt_text(body: dict[str, Any], route: str) -> str:
    """The prompt as the pipeline's interactions carry it (plain text): a completion's prompt;
    a chat's single user message, or its turns as `role: content` lines."""
    if route != "chat":
        prompt = body.get("prompt")
        return "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt or "")
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return _content(messages[0].get("content"))
    return "\n".join(f"{m.get('role', 'user')}: {_content(m.get('content'))}" for m in messages)


def _content(content: Any) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content
                       if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


class FeedbackError(ValueError):
    """Feedback that cannot be taken: `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AnswerStore:
    """Answers by id in Redis (a hash with a TTL each)."""

    def __init__(self, settings: Settings, client: redis.Redis, ttl_s: int) -> None:
        self.r, self.keys, self.ttl_s = client, RedisKeys(settings), ttl_s

    def put(self, answer: Answer) -> None:
        key = self.keys.answer(answer.answer_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"a": orjson.dumps({
            "p": answer.policy_id, "n": answer.namespace, "r": answer.revision,
            "q": answer.prompt, "t": answer.response})})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def get(self, answer_id: str) -> Answer | None:
        if not answer_id or len(answer_id) > 128:
            return None
        raw = cast("bytes | None", self.r.hget(self.keys.answer(answer_id), "a"))
        if raw is None:
            return None
        d = orjson.loads(raw)
        return Answer(answer_id, d["p"], d["n"], int(d["r"]), d["q"], d["t"])

    def claim_feedback(self, answer_id: str, fingerprint: bytes) -> bool:
        """True for the first feedback on an answer and for exact repeats of it."""
        key = self.keys.answer(answer_id)
        if self.r.hsetnx(key, "f", fingerprint):
            return True
        return cast("bytes | None", self.r.hget(key, "f")) == fingerprint


def feedback_event(answer: Answer, score: float, correction: str | None) -> InteractionLogged:
    """The interaction log one piece of feedback becomes (validated like any producer's)."""
    if answer.policy_id is None:
        raise FeedbackError(400, "this answer came from the base model: there is no policy to "
                                 "train (name a policy as the model)")
    return InteractionLogged(
        event_id=derive_id("feedback", answer.answer_id), policy_id=answer.policy_id,
        prompt=answer.prompt[-MAX_PROMPT_CHARS:] or " ",
        task="reference" if correction else "feedback",
        reference=correction[:MAX_PROMPT_CHARS] if correction else None,
        response=answer.response[:MAX_PROMPT_CHARS], feedback=score,
        served_revision=answer.revision, answer_id=answer.answer_id)


def parse_feedback(body: Any) -> tuple[str, float, str | None]:
    """(answer id, score, correction) from `POST /v1/feedback`, or FeedbackError(400)."""
    if not isinstance(body, dict):
        raise FeedbackError(400, "the body must be a JSON object")
    answer_id, score, correction = body.get("id"), body.get("score"), body.get("correction")
    if not isinstance(answer_id, str) or not answer_id:
        raise FeedbackError(400, "'id' must be the id of an answer")
    if isinstance(score, bool) or not isinstance(score, int | float) or not -1.0 <= score <= 1.0:
        raise FeedbackError(400, "'score' must be a number in [-1, 1]")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise FeedbackError(400, "'correction' must be a non-empty string when given")
    return answer_id, float(score), correction
