"""A stage's admission, looked up once per batch and kept fresh during long batches.

Admission (`workers.pipeline.guards.Admission`) costs a Redis round trip per check; looked up
per event it would be the ingest path's main cost. So a batch's policies are looked up
together, and the answers are refreshed when older than `ADMISSION_TTL_S`, so a pause set by
another process during a long batch still stops it.
"""

from __future__ import annotations

import time

from schemas.errors import PoisonEventError
from workers.pipeline.context import StageContext
from workers.pipeline.guards import Admission

ADMISSION_TTL_S = 1.0


class AdmissionCache:
    def __init__(self, admission: Admission, ctx: StageContext) -> None:
        self.admission, self.ctx = admission, ctx
        self._refusals: dict[str, PoisonEventError | None] = {}
        self._at = 0.0

    def start_batch(self, policies: list[str]) -> None:
        """Forget the last batch's answers and look up this one's policies in one go."""
        self._refusals.clear()
        self._look_up(policies)

    def refusals(self, policies: list[str]) -> dict[str, PoisonEventError | None]:
        """Why each policy is refused now (None: admitted)."""
        if not self.admission.checks:
            return dict.fromkeys(policies)
        if time.monotonic() - self._at > ADMISSION_TTL_S:  # all of it, at once
            self._look_up(list(dict.fromkeys([*self._refusals, *policies])))
        else:
            self._look_up([p for p in policies if p not in self._refusals])
        return {p: self._refusals[p] for p in policies}

    def forget(self, policy_id: str) -> None:
        """Its next event looks again (it was just paused)."""
        self._refusals.pop(policy_id, None)

    def _look_up(self, policies: list[str]) -> None:
        if policies and self.admission.checks:
            self._refusals.update(self.admission.refusals(self.ctx, policies))
            self._at = time.monotonic()
