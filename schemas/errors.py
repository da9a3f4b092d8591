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


class EventFailures(LorastreamError):
    """A batched stage call failed for some events only (keyed by event id).

    Like `PolicyFailures`, but finer: the rollout stage samples interactions of many policies
    in one engine pass, and one bad interaction (an unknown reward function) must cost neither
    its batch-mates nor the other interactions of its own policy their rollouts. `outputs` are
    valid and must be sent; each event in `failures` is dead-lettered with its own error.
    """

    def __init__(self, outputs: Sequence[object], failures: dict[str, Exception]) -> None:
        super().__init__("; ".join(f"{e}: {x}" for e, x in failures.items()))
        self.outputs = list(outputs)
        self.failures = failures
