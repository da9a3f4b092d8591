"""The small exception tree every stage uses to decide: retry, or dead-letter and move on."""

from __future__ import annotations


class LorastreamError(Exception):
    """Root of lorastream's own errors."""


class RetryableError(LorastreamError):
    """A transient failure (service unavailable, timeout): the same event may succeed later."""


class PoisonEventError(LorastreamError, ValueError):
    """The event itself is bad (malformed, invalid, unknown policy): never retry it."""


class TrainingRejected(LorastreamError):
    """A training step produced a non-finite loss or gradient and was not applied."""
