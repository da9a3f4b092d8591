"""Every Redis key lorastream uses, built here and nowhere else: the layout is one fact.

All keys start with `Settings.redis_prefix`, so tenants and tests never collide. Who owns what:

| key | type | written by |
|---|---|---|
| `seen:<stage>:<event>` | string (TTL) | the stage runner: an input was handled |
| `heldout:<policy>` | hash | the rollout stage: held-out prompts by event id |
| `scores:<policy>` | hash | the evaluate stage: held-out scores by revision and prompt set |
| `policy:<policy>` | hash | the update stage (checkpoint step), the runner (in-flight counters) |
| `paused:<policy>` | hash | the guards: why and where training of a policy stopped |
| `online:<policy>:<rev>` | list | the guards: the serving revision's latest rollout rewards |
| `pairs:<policy>` | hash | the rollout stage: logged responses waiting for a dpo partner |
| `c:<policy>` | hash | the catalog index: identity, revisions, states, aliases |
| `cx:bases`, `cx:loras`, `cx:trainings` | hash | the catalog index: interned bases, configs |
| `cx:lock:<policy>`, `cx:steps:<policy>` | string, hash | the catalog writer |
| `hot` | zset | the catalog index: serve names of every serving revision |
| `engines`, `engine:<id>:<what>` | hash, … | serving: membership and per-engine state |
"""

from __future__ import annotations

from infra.settings import Settings


class RedisKeys:
    """Key builders for one prefix; cheap to make, so each owner makes its own."""

    def __init__(self, settings: Settings) -> None:
        self._key = settings.key

    # -- the pipeline ------------------------------------------------------------------------
    def seen(self, stage: str, event_id: str) -> str:
        return self._key("seen", stage, event_id)

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

    # -- the catalog -------------------------------------------------------------------------
    def catalog(self, policy_id: str) -> str:
        return self._key("c", policy_id)

    def catalog_table(self, table: str) -> str:
        """Interned values shared by many policies (`bases`, `loras`, `trainings`)."""
        return self._key("cx", table)

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

    # -- patterns (SCAN) ---------------------------------------------------------------------
    def pattern(self, *parts: str) -> str:
        """A SCAN pattern under the prefix, e.g. `pattern("paused", "*")`."""
        return self._key(*parts)
