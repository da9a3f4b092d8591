"""What a request's `model` names, and whether its key may use it: one catalog round trip.

`model` is a policy (its `serving` alias), `policy@rev` (a pinned revision) or the base model
(its id as the engines report it, or `base`). A policy outside the key's namespace answers
exactly like an unknown one (404), so keys cannot probe other tenants' policy names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.catalog.entries import Lookup

POLICY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BASE_ALIASES = frozenset({"base"})


class ModelNotFound(LookupError):
    """The 404 a request gets for a model it cannot use (unknown, other namespace, no such
    revision)."""


@dataclass(frozen=True)
class Target:
    """Where a request goes: a policy's revision (0 = explicitly the base model)."""

    policy_id: str | None
    """None: the base model itself was asked for."""
    namespace: str
    revision: int
    serve_name: str | None

    @property
    def label(self) -> str:
        """The `model` an answer reports: the revision that answered, e.g. `alice@3`."""
        return f"{self.policy_id}@{self.revision}" if self.policy_id else "base"


def parse_model(model: str, base_ids: set[str]) -> tuple[str, int | None] | None:
    """(policy, pinned revision or None), or None for the base model; ModelNotFound for a
    name no policy can have."""
    if model in BASE_ALIASES or model in base_ids:
        return None
    policy, sep, rev = model.partition("@")
    if not POLICY.match(policy) or (sep and not rev.isdigit()):
        raise ModelNotFound(f"The model `{model}` does not exist.")
    return policy, int(rev) if sep else None


def check(model: str, found: Lookup | None, namespace: str) -> Target:
    """The target a lookup found, if a key of `namespace` may use it (else ModelNotFound)."""
    policy = model.partition("@")[0]
    if found is None or found.namespace != namespace:
        raise ModelNotFound(f"The model `{model}` does not exist.")
    if not found.recorded or found.collected:
        raise ModelNotFound(f"The model `{model}` does not exist: {policy} has no revision "
                            f"{found.revision} that can be served.")
    return Target(policy, namespace, found.revision, found.serve_name)
