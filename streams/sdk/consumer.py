"""Consumer SDK: evaluation events as an async iterator, at-least-once, in your own group.

```python
async with EvaluationConsumer(settings, "my-dashboard") as evaluations:
    async for ev in evaluations:      # validated AdapterEvaluated events
        handle(ev)                    # the offset is committed when you ask for the next one
```

Offsets are committed only for events the caller has finished with: asking for the next event
(or leaving the `async with` block normally) marks the previous one done. If processing raises,
that event is not committed and is delivered again to whoever consumes the partition next. Values
that are not valid `AdapterEvaluated` events are skipped with a warning, counted in `skipped`
(and `lorastream_sdk_skipped_total`), and committed past, so one bad producer cannot wedge a
consumer. Using a group of its own means it never takes partitions from the pipeline's stages.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection
from types import TracebackType

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from infra.security import aiokafka_config
from infra.settings import Settings
from schemas.codec import decode_event
from schemas.errors import PoisonEventError
from schemas.events import AdapterEvaluated
from streams.ops import metrics

log = logging.getLogger(__name__)


class _Revoked(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move to another member: commit what is done, forget the rest."""

    def __init__(self, owner: EvaluationConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self.owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        return None


class EvaluationConsumer:
    """Validated `AdapterEvaluated` events from the evaluations topic, in group `group_id`.

    `from_beginning` applies when the group has no committed offset yet (a new group): read the
    whole retained topic instead of only new events. `policies` keeps only those policies' events
    (others are committed past). `idle_timeout_s` ends the iteration after that long without an
    event, for scripts; the default waits forever.
    """

    def __init__(self, settings: Settings, group_id: str, *, from_beginning: bool = False,
                 policies: Collection[str] | None = None,
                 idle_timeout_s: float | None = None) -> None:
        if not group_id:
            raise ValueError("group_id is required: each consumer of evaluations owns a group")
        self.settings, self.group_id = settings, group_id
        self.topic = settings.topic("evaluations")
        self.from_beginning = from_beginning
        self.policies = set(policies) if policies is not None else None
        self.idle_timeout_s = idle_timeout_s
        self.skipped = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._buffer: deque[ConsumerRecord] = deque()
        self._done: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._current: tuple[TopicPartition, int] | None = None  # yielded, not yet done

    async def start(self) -> None:
        """Join the group (called by `async with` or the first iteration)."""
        if self._consumer is not None:
            return
        s = self.settings
        consumer = AIOKafkaConsumer(
            **aiokafka_config(s),
            group_id=self.group_id,
            client_id=f"{s.app_id}-sdk-{self.group_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
        )
        consumer.subscribe([self.topic], listener=_Revoked(self))
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise ConnectionError(f"cannot consume {self.topic!r} from Kafka at "
                                  f"{s.bootstrap_servers}: {exc}") from exc
        self._consumer = consumer

    async def commit(self) -> None:
        """Commit every event finished so far (the one being processed is not finished)."""
        if self._consumer is None or not self._done:
            return
        offsets = {tp: OffsetAndMetadata(off, "") for tp, off in self._done.items()}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:  # lost the partitions meanwhile
            log.warning("%s: commit failed (%s); those events will be delivered again",
                        self.group_id, exc)
        self._done.clear()

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def __aenter__(self) -> EvaluationConsumer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if exc_type is None:  # left normally: the last event was handled
                self._finish_current()
                await self.commit()
        finally:
            await self.close()

    def __aiter__(self) -> EvaluationConsumer:
        return self

    async def __anext__(self) -> AdapterEvaluated:
        await self.start()
        self._finish_current()  # asking for the next event means the last one is done
        await self.commit()
        deadline = None if self.idle_timeout_s is None else time.monotonic() + self.idle_timeout_s
        while True:
            rec = await self._next_record(deadline)
            if rec is None:
                raise StopAsyncIteration
            tp = TopicPartition(rec.topic, rec.partition)
            event = self._decode(rec)
            if event is None or (self.policies is not None
                                 and event.policy_id not in self.policies):
                self._done[tp] = rec.offset + 1  # nothing to hand over: move past it
                continue
            self._current = (tp, rec.offset + 1)
            return event

    def _finish_current(self) -> None:
        if self._current is not None:
            tp, offset = self._current
            self._done[tp] = offset
            self._current = None

    async def _next_record(self, deadline: float | None) -> ConsumerRecord | None:
        assert self._consumer is not None
        while not self._buffer:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await self.commit()  # skipped records count as done; don't hold them while idle
            batches = await self._consumer.getmany(timeout_ms=200, max_records=100)
            for records in batches.values():
                self._buffer.extend(records)
        return self._buffer.popleft()

    def _decode(self, rec: ConsumerRecord) -> AdapterEvaluated | None:
        try:
            return decode_event(AdapterEvaluated, rec.value)
        except PoisonEventError as exc:
            self.skipped += 1
            metrics.SDK_SKIPPED.labels(topic=rec.topic).inc()
            log.warning("%s: skipping undecodable event at %s[%d]@%d: %s", self.group_id,
                        rec.topic, rec.partition, rec.offset, exc)
            return None

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        done = {tp: off for tp, off in self._done.items() if tp in revoked}
        if done and self._consumer is not None:
            try:
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(off, "") for tp, off in done.items()})
            except KafkaError as exc:
                log.warning("%s: commit on revocation failed: %s", self.group_id, exc)
        for tp in revoked:
            self._done.pop(tp, None)
        if self._current is not None and self._current[0] in revoked:
            self._current = None  # its new owner will deliver it again (at-least-once)
        self._buffer = deque(r for r in self._buffer
                             if TopicPartition(r.topic, r.partition) not in revoked)
