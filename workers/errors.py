"""The small exception tree every stage uses to decide: retry, or dead-letter and move on."""

from __future__ import annotations

from collections.abc import Sequence


class LorastreamError(Exception):
    """Root of lorastream's own errors."""


class RetryableError(LorastreamError):
    """A transient failure (service unavailable, timeout): the same event may succeed later."""


class PoisonEventError(LorastreamError, ValueError):
    """The event itself is bad (malformed, invalid, unknown policy): never retry it."""


class TrainingRejected(LorastreamError):
    """A training step produced a non-finite loss or gradient and was not applied."""


class PolicyFailures(LorastreamError):
    """A batched stage call failed for some policies only.

    `outputs` (the other policies' results) are valid and must be sent; the events of each
    policy in `failures` are dead-lettered with that policy's own error, so one bad policy
    never costs the others their step.
    """

    def __init__(self, outputs: Sequence[object], failures: dict[str, Exception]) -> None:
        super().__init__("; ".join(f"{p}: {e}" for p, e in failures.items()))
        self.outputs = list(outputs)
        self.failures = failures
