"""The pipeline's topics, declared once: name, partitions and configs.

Topics are created before any worker starts (aiokafka can loop on metadata when a worker first
produces to a topic that does not exist yet), so this table is the single place that says what
exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    """A logical topic; the full name is `settings.topic(name)`."""

    name: str
    compacted: bool = False
    retention_ms: int | None = None
    configs: dict[str, str] = field(default_factory=dict)

    def kafka_configs(self) -> dict[str, str]:
        out = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if self.retention_ms is not None:
            out["retention.ms"] = str(self.retention_ms)
        out.update(self.configs)
        return out


WEEK_MS = 7 * 24 * 3600 * 1000

# Stage order: interactions -> rollouts -> rewards -> updates -> exports -> evaluations
# -> promotions. Keyed by policy id so one policy's events stay in order on one partition.
PIPELINE_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("interactions", retention_ms=WEEK_MS),
    TopicSpec("rollouts", retention_ms=WEEK_MS),
    TopicSpec("rewards", retention_ms=WEEK_MS),
    TopicSpec("updates", retention_ms=WEEK_MS),
    TopicSpec("exports", retention_ms=WEEK_MS),
    TopicSpec("evaluations", retention_ms=WEEK_MS),
    TopicSpec("promotions", retention_ms=WEEK_MS),
    TopicSpec("dead-letters", retention_ms=4 * WEEK_MS),
    # What the gateway served (a sample): revision, latency and tokens per answer.
    TopicSpec("served", retention_ms=WEEK_MS),
    # Keyed state (latest record per key wins): the durable catalog of revisions and aliases.
    TopicSpec(
        "catalog",
        compacted=True,
        configs={"min.compaction.lag.ms": "0", "segment.ms": "600000"},
    ),
)


def topic_names(settings: Settings) -> list[str]:
    return [settings.topic(t.name) for t in PIPELINE_TOPICS]
