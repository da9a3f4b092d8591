"""Every Redis key lorastream uses, built here and nowhere else: the layout is one fact.

All keys start with `Settings.redis_prefix`, so tenants and tests never collide. Who owns what:

| key | type | written by |
|---|---|---|
| `seen:<stage>:<event>` | string (TTL) | the stage runner: an input was handled (not bulk) |
| `heldout:<policy>` | hash | the rollout stage: held-out prompts by event id |
| `scores:<policy>` | hash | the evaluate stage: held-out scores by revision and prompt set |
| `policy:<policy>` | hash | the update stage (checkpoint step), the runner (in-flight counters) |
| `paused:<policy>` | hash | the guards: why and where training of a policy stopped |
| `online:<policy>:<rev>` | list | the guards: the serving revision's latest rollout rewards |
| `pairs:<policy>` | hash | the rollout stage: logged responses waiting for a dpo partner |
| `online:<policy>:<rev>:feedback` | list | the gateway: a revision's latest production feedback |
| `c:<policy>` | hash | the catalog index: identity, revisions, states, aliases |
| `cx:bases`, `cx:loras`, `cx:trainings` | hash | the catalog index: interned bases, configs |
| `cx:ns:<namespace>` | set | the catalog index: the policies of a namespace (tenant) |
| `cx:lock:<policy>`, `cx:steps:<policy>` | string, hash | the catalog writer |
| `hot` | zset | the catalog index: serve names of every serving revision |
| `engines`, `engine:<id>:<what>` | hash, … | serving: membership and per-engine state |
| `apikeys`, `apikey:<sha256>` | hash, string | `lorastream keys`: key metadata; hash → key |
| `answer:<id>` | hash (TTL) | the gateway: what it answered, for feedback |
"""

from __future__ import annotations

from collections.abc import Iterable

from infra.settings import Settings


class RedisKeys:
    """Key builders for one prefix; cheap to make, so each owner makes its own."""

    def __init__(self, settings: Settings) -> None:
        self._key = settings.key

    # -- the pipeline ------------------------------------------------------------------------
    def seen(self, stage: str, event_id: str) -> str:
        return self._key("seen", stage, event_id)

    def seen_many(self, stage: str, event_ids: Iterable[str]) -> list[str]:
        """`seen` for a batch: the prefix is built once (the ingest path builds a key an event)."""
        prefix = self._key("seen", stage, "")
        return [prefix + e for e in event_ids]

    def heldout(self, policy_id: str) -> str:
        return self._key("heldout", policy_id)

    def scores(self, policy_id: str) -> str:
        return self._key("scores", policy_id)

    def policy(self, policy_id: str) -> str:
        return self._key("policy", policy_id)

    def paused(self, policy_id: str) -> str:
        return self._key("paused", policy_id)

    def online_rewards(self, policy_id: str, revision: int) -> str:
        return self._key("online", policy_id, revision)

    def online_rolled_back(self, policy_id: str, revision: int) -> str:
        return self._key("online", policy_id, revision, "rolled_back")

    def pairs(self, policy_id: str) -> str:
        return self._key("pairs", policy_id)

    def online_feedback(self, policy_id: str, revision: int) -> str:
        """Production feedback scores of one revision, newest first (a bounded window)."""
        return self._key("online", policy_id, revision, "feedback")

    # -- the catalog -------------------------------------------------------------------------
    def catalog(self, policy_id: str) -> str:
        return self._key("c", policy_id)

    def catalog_table(self, table: str) -> str:
        """Interned values shared by many policies (`bases`, `loras`, `trainings`)."""
        return self._key("cx", table)

    def catalog_namespace(self, namespace: str) -> str:
        """The policy ids of one namespace (what a namespace's API key may list and use)."""
        return self._key("cx", "ns", namespace)

    def catalog_lock(self, policy_id: str) -> str:
        return self._key("cx", "lock", policy_id)

    def step_notes(self, policy_id: str) -> str:
        return self._key("cx", "steps", policy_id)

    def hot(self) -> str:
        return self._key("hot")

    # -- serving -----------------------------------------------------------------------------
    def engines(self) -> str:
        return self._key("engines")

    def engine(self, engine_id: str, what: str) -> str:
        return self._key("engine", engine_id, what)

    # -- the gateway -------------------------------------------------------------------------
    def api_keys(self) -> str:
        """key id -> JSON metadata (namespace, name, created, sha256); never the key itself."""
        return self._key("apikeys")

    def api_key(self, digest: str) -> str:
        """sha256 of a key -> its key id and namespace (the lookup a request pays)."""
        return self._key("apikey", digest)

    def answer(self, answer_id: str) -> str:
        return self._key("answer", answer_id)

    # -- patterns (SCAN) ---------------------------------------------------------------------
    def pattern(self, *parts: str) -> str:
        """A SCAN pattern under the prefix, e.g. `pattern("paused", "*")`."""
        return self._key(*parts)
