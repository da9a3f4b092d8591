"""A small client for the gateway: chat with a policy, send feedback on its answer.

The gateway speaks OpenAI's API, so the official `openai` client works too; this one adds what
OpenAI's does not have (feedback, the revision that answered) with no dependency beyond the
standard library.

    from streams.sdk.gateway import GatewayClient

    gw = GatewayClient("http://127.0.0.1:8800", api_key="lsk-…")
    answer = gw.chat("alice", "What is 2+2?", max_tokens=16)
    print(answer.revision, answer.text)
    gw.feedback(answer.id, 1.0)                       # or a correction:
    gw.feedback(answer.id, -1.0, correction="4")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class GatewayError(RuntimeError):
    """The gateway refused: HTTP status, OpenAI's error message and code, Retry-After."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


@dataclass(frozen=True)
class ChatAnswer:
    id: str
    text: str
    model: str
    """The revision that answered, e.g. `alice@3` (`alice@0`: the base model, explicitly)."""
    finish_reason: str
    usage: dict[str, int]

    @property
    def revision(self) -> int:
        return int(self.model.rpartition("@")[2]) if "@" in self.model else 0


class GatewayClient:
    """Blocking client (urllib); thread-safe."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw).get("error", {})
            except ValueError:
                err = {"message": raw.decode(errors="replace")}
            retry = exc.headers.get("Retry-After")
            raise GatewayError(exc.code, str(err.get("message")), err.get("code"),
                               float(retry) if retry else None) from None

    def chat(self, policy: str, messages: str | list[dict[str, Any]], **params: Any
             ) -> ChatAnswer:
        """One chat answer from `policy` (or `policy@rev`); `params` are OpenAI's
        (`max_tokens`, `temperature`, `seed`, ...)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        out = self._request("POST", "/v1/chat/completions",
                            {"model": policy, "messages": messages, **params})
        choice = out["choices"][0]
        return ChatAnswer(out["id"], choice["message"]["content"] or "", out["model"],
                          choice.get("finish_reason") or "", out.get("usage") or {})

    def feedback(self, answer_id: str, score: float, correction: str | None = None
                 ) -> dict[str, Any]:
        """Rate an answer in [-1, 1] (optionally with the answer you wanted); it becomes an
        interaction log that trains the policy. Returns the gateway's receipt."""
        body: dict[str, Any] = {"id": answer_id, "score": score}
        if correction is not None:
            body["correction"] = correction
        return dict(self._request("POST", "/v1/feedback", body))

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models")["data"])
