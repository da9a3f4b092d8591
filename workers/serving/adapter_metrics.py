"""Per-adapter serving metrics, on the gateway and on the engine, with bounded cardinality.

SGLang has no per-adapter metrics (its pool gauges carry no adapter label), so lorastream
counts per policy and revision itself: requests, errors, tokens in and out, time to first token
and latency (histograms). One label per policy would let 10^5 policies (or a client naming
random models) blow up every scrape, so only the top `n` policies by traffic get their own
label (`TopN`: Space-Saving counts over a bounded table); every other policy is counted as
`other`, and a policy that drops out of the top `n` has its series removed. Each labelled policy
keeps its latest `revisions` revisions. The `component` label says who counted (`gateway` or
`engine`), so both can share one process and one registry in tests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

OTHER = "other"
LABELS = ("component", "policy", "revision")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("lorastream_adapter_requests_total", "Requests answered, per policy and "
                   "revision (top policies by traffic; the rest as 'other').", LABELS)
ERRORS = Counter("lorastream_adapter_errors_total", "Requests that failed, per policy, "
                 "revision and HTTP status.", [*LABELS, "code"])
TOKENS = Counter("lorastream_adapter_tokens_total", "Prompt (in) and completion (out) tokens.",
                 [*LABELS, "direction"])
TTFT = Histogram("lorastream_adapter_ttft_seconds", "Time to the first token (a non-streamed "
                 "answer's first token arrives with the last).", LABELS, buckets=_SECONDS)
LATENCY = Histogram("lorastream_adapter_latency_seconds", "Time to the whole answer.", LABELS,
                    buckets=_SECONDS)
COLD_WAITS = Counter("lorastream_gateway_cold_waits_total", "Requests that waited for a cold "
                     "load, by outcome (loaded, timeout, failed).", ["outcome"])
COLD_WAIT_SECONDS = Histogram("lorastream_gateway_cold_wait_seconds", "How long requests "
                              "waited for a cold load.", buckets=_SECONDS)


def split_serve_name(name: str | None) -> tuple[str, str]:
    """`policy@rev` -> (policy, rev); None (the base model) -> ('base', '0'); any other adapter
    name -> (name, '-')."""
    if name is None:
        return "base", "0"
    policy, sep, rev = name.rpartition("@")
    return (policy, rev) if sep and rev.isdigit() else (name, "-")


class TopN:
    """Which policies get their own label: the `n` with the most traffic.

    Space-Saving: at most `table` policies are counted; a new one replaces the least counted
    and inherits its count (+1), so a policy's count overestimates by at most what it
    inherited. A policy outside the labelled set takes the place of the least counted labelled
    one once its guaranteed count (count minus what it inherited) is higher, so a flood of
    one-off names never takes a label."""

    def __init__(self, n: int = 50, table: int | None = None) -> None:
        self.n, self.table = n, table or max(8 * n, 64)
        self.counts: dict[str, int] = {}
        self.inherited: dict[str, int] = {}
        self.labelled: set[str] = set()

    def admit(self, policy: str) -> tuple[str, str | None]:
        """(label for this request, a policy that lost its label now or None)."""
        count = self.counts.get(policy)
        if count is None:
            count = 0
            if len(self.counts) >= self.table:
                victim = min((p for p in self.counts if p not in self.labelled),
                             key=self.counts.__getitem__, default=None)
                if victim is not None:
                    count = self.counts.pop(victim)
                    self.inherited.pop(victim, None)
            self.inherited[policy] = count
        self.counts[policy] = count + 1
        if policy in self.labelled:
            return policy, None
        if len(self.labelled) < self.n:
            self.labelled.add(policy)
            return policy, None
        weakest = min(self.labelled, key=self.counts.__getitem__)
        if self.counts[policy] - self.inherited.get(policy, 0) <= self.counts[weakest]:
            return OTHER, None
        self.labelled.discard(weakest)
        self.labelled.add(policy)
        return policy, weakest


@dataclass
class AdapterMetrics:
    """The per-adapter metrics one component records; thread-safe (the engine's HTTP thread
    and tests may share it)."""

    component: str
    top: int = 50
    revisions: int = 3
    _top: TopN = field(init=False)
    _series: dict[str, dict[str, set[tuple[str, ...]]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _children: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    """(policy, revision) -> its labelled series (label lookups cost more than the update)."""

    def __post_init__(self) -> None:
        self._top = TopN(self.top)

    def labels(self, policy: str, revision: str) -> tuple[str, str]:
        """The (policy, revision) labels a request is counted under."""
        with self._lock:
            label, evicted = self._top.admit(policy)
            if evicted is not None:
                self._forget(evicted)
            if label == OTHER:
                return OTHER, OTHER
            revs = self._series.setdefault(label, {})
            if revision not in revs:
                revs[revision] = set()
                while len(revs) > self.revisions:
                    oldest = min(revs, key=lambda r: int(r) if r.isdigit() else -1)
                    self._remove(label, oldest, revs.pop(oldest))
            return label, revision

    def _note(self, policy: str, revision: str, extra: tuple[str, ...]) -> None:
        if policy != OTHER:
            self._series.get(policy, {}).setdefault(revision, set()).add(extra)

    def _forget(self, policy: str) -> None:
        for revision, extras in self._series.pop(policy, {}).items():
            self._remove(policy, revision, extras)

    def _remove(self, policy: str, revision: str, extras: set[tuple[str, ...]]) -> None:
        self._children.pop((policy, revision), None)
        base = (self.component, policy, revision)
        for metric in (REQUESTS, TTFT, LATENCY):
            _quiet_remove(metric, base)
        for extra in extras:
            metric = ERRORS if extra[0] == "code" else TOKENS
            _quiet_remove(metric, (*base, extra[1]))

    def answered(self, name: str | None, *, prompt_tokens: int, completion_tokens: int,
                 latency_s: float, ttft_s: float | None = None) -> None:
        policy, revision = self.labels(*split_serve_name(name))
        with self._lock:
            children = self._children.get((policy, revision))
            if children is None:
                self._note(policy, revision, ("direction", "in"))
                self._note(policy, revision, ("direction", "out"))
                base = (self.component, policy, revision)
                children = (REQUESTS.labels(*base), TOKENS.labels(*base, "in"),
                            TOKENS.labels(*base, "out"), LATENCY.labels(*base),
                            TTFT.labels(*base))
                self._children[(policy, revision)] = children
        requests, tokens_in, tokens_out, latency, ttft = children
        requests.inc()
        tokens_in.inc(prompt_tokens)
        tokens_out.inc(completion_tokens)
        latency.observe(latency_s)
        ttft.observe(latency_s if ttft_s is None else ttft_s)

    def failed(self, name: str | None, code: int) -> None:
        policy, revision = self.labels(*split_serve_name(name))
        with self._lock:
            self._note(policy, revision, ("code", str(code)))
        ERRORS.labels(self.component, policy, revision, str(code)).inc()

    def failed_unresolved(self, code: int) -> None:
        """A request that never named a known adapter (bad key, unknown policy, bad body)."""
        ERRORS.labels(self.component, "-", "-", str(code)).inc()

    def labelled(self) -> Iterator[str]:
        yield from sorted(self._series)


def _quiet_remove(metric: Counter | Histogram, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
