"""`lorastream dashboard`: a web page for operators, and the JSON API behind it.

Everything shown comes from the same sources the pipeline uses, read without side effects:
consumer lag from the broker's committed and log-end offsets (`infra.admin`), training and
revision history from the pipeline topics (read without a consumer group, like `follow.py`, so
the dashboard never takes partitions from a worker), serving state from the catalog index in Redis.
Two background threads sample Kafka; request handlers only read their snapshots, so a slow
broker makes the page stale, never hung. The page is one self-contained file (no CDN).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.admin import LagRow, LagTracker, consumer_lag, lag_by_topic
from infra.settings import Settings
from streams.ops import metrics
from streams.sdk.producer import kafka_client_config
from workers.catalog.index import CatalogIndex
from workers.keys import RedisKeys

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"
HISTORY_POINTS = 300
CURVE_POINTS = 500
FOLLOWED = ("updates", "exports", "evaluations", "promotions")


class LagSampler:
    """Samples consumer lag every `interval_s`: latest rows with rates, and per-topic history."""

    def __init__(self, settings: Settings, interval_s: float) -> None:
        self.settings, self.interval_s = settings, interval_s
        self.tracker = LagTracker()
        self.rows: list[LagRow] = []
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self.error: str | None = None
        self.lock = threading.Lock()

    def sample(self) -> None:
        try:
            rows = self.tracker.add(consumer_lag(self.settings))
        except Exception as exc:  # keep the last good sample; show the error on the page
            with self.lock:
                self.error = f"{type(exc).__name__}: {exc}"
            return
        metrics.set_consumer_lag(rows)
        strip = len(self.settings.topic_prefix)
        point = {"ts": time.time(),
                 "topics": {t[strip:]: v["lag"] for t, v in lag_by_topic(rows).items()}}
        with self.lock:
            self.rows, self.error = rows, None
            self.history.append(point)

    def snapshot(self) -> dict[str, Any]:
        strip = len(self.settings.topic_prefix)
        with self.lock:
            rows = list(self.rows)
            history, error = list(self.history), self.error
        return {
            "rows": [{**r.as_dict(), "topic": r.topic[strip:]} for r in rows],
            "by_topic": {t[strip:]: v for t, v in lag_by_topic(rows).items()},
            "total": sum(r.lag for r in rows),
            "history": history,
            "error": error,
            "throughput": stage_throughput(self.settings, rows),
        }


def stage_throughput(settings: Settings, rows: list[LagRow]) -> dict[str, float | None]:
    """Records per second each stage consumes: its pipeline groups' rate on its source topic."""
    from streams.agents import STAGES

    out: dict[str, float | None] = {name: None for name in STAGES}
    for name, spec in STAGES.items():
        for r in rows:
            stages = r.group.removeprefix(f"{settings.app_id}.").split("+")
            if (r.group.startswith(f"{settings.app_id}.") and name in stages
                    and r.topic == settings.topic(spec.reads) and r.rate is not None):
                out[name] = round((out[name] or 0.0) + r.rate, 3)
    return out


class PipelineView:
    """Per-policy reward curves and revision history with provenance, from the topics."""

    def __init__(self) -> None:
        self.curves: dict[str, deque[dict[str, Any]]] = {}
        self.revisions: dict[str, dict[int, dict[str, Any]]] = {}
        self.events = 0
        self.lock = threading.Lock()

    def apply(self, kind: str, e: dict[str, Any]) -> None:
        pid = e.get("policy_id")
        if not isinstance(pid, str):
            return
        with self.lock:
            self.events += 1
            if kind == "updates":
                curve = self.curves.setdefault(pid, deque(maxlen=CURVE_POINTS))
                curve.append({k: e.get(k) for k in ("step", "mean_reward", "loss", "kl", "ts")})
            else:
                self._apply_revision(pid, kind, e)

    def _apply_revision(self, pid: str, kind: str, e: dict[str, Any]) -> None:
        rolled_back = e.get("kind") == "policy_rolled_back"
        rev = e.get("from_revision" if rolled_back else "revision")
        if not isinstance(rev, int) or rev < 1:
            return
        entry = self.revisions.setdefault(pid, {}).setdefault(rev, {"revision": rev})
        if kind == "exports":
            entry.update({k: e.get(k) for k in ("step", "parent_revision", "sha256", "path",
                                                "size_bytes", "base_model", "rank")})
            entry["exported_ts"] = e.get("ts")
        elif kind == "evaluations":
            entry.update({k: e.get(k) for k in ("score", "baseline_revision", "baseline_score",
                                                "passed", "reason")})
        elif kind == "promotions":
            entry["rolled_back_ts" if rolled_back else "promoted_ts"] = e.get("ts")

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "curves": {p: list(c) for p, c in self.curves.items()},
                "revisions": {p: [r[k] for k in sorted(r)] for p, r in self.revisions.items()},
                "events": self.events,
            }


class TopicReader:
    """Reads the followed topics from the beginning into a `PipelineView` (a thread)."""

    def __init__(self, settings: Settings, view: PipelineView) -> None:
        self.settings, self.view = settings, view
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-topics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as exc:  # broker restarts: reconnect and read everything again
                log.warning("dashboard: reading topics failed (%s); retrying", exc)
                self._stop.wait(2.0)

    def _follow(self) -> None:
        consumer = KafkaConsumer(**kafka_client_config(self.settings), enable_auto_commit=False)
        try:
            parts = []
            for name in FOLLOWED:
                topic = self.settings.topic(name)
                parts += [TopicPartition(topic, p)
                          for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            strip = len(self.settings.topic_prefix)
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=250).values():
                    for rec in records:
                        self._apply(rec.topic[strip:], rec.value)
        finally:
            consumer.close()

    def _apply(self, kind: str, value: bytes | None) -> None:
        try:
            event = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return  # the stages dead-letter these; nothing to chart
        if isinstance(event, dict):
            self.view.apply(kind, event)


def serving_state(index: CatalogIndex, settings: Settings, names: set[str]) -> dict[str, Any]:
    """Policies' serving and head revisions, the hot set, and what each engine holds (Redis)."""
    policies = {}
    for pid in sorted(set(index.policy_ids()) | names):
        policies[pid] = {"serving": index.serving(pid).revision, "head": index.head(pid).revision}
    return {"policies": policies, "hot_set": index.hot_set(),
            "engines": engine_state(settings, index.r)}


def engine_state(settings: Settings, r: Any) -> dict[str, dict[str, Any]]:
    """Per registered engine: alive, its share of the hot set, and each adapter's residency.

    Read from the keys the serving controllers publish (`workers.serving.assignment`).
    """
    from workers.serving.assignment import engine_key, live_engines

    alive = live_engines(settings, r)
    out = {}
    for engine in sorted(_text(e) for e in r.hkeys(RedisKeys(settings).engines())):
        states = r.hgetall(engine_key(settings, engine, "states"))
        out[engine] = {
            "alive": engine in alive,
            "assigned": [_text(m) for m in r.zrange(engine_key(settings, engine, "assigned"),
                                                    0, -1)],
            "states": {_text(k): _text(v) for k, v in sorted(states.items())},
        }
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Dashboard:
    """The aiohttp application and the samplers it reads from."""

    def __init__(self, settings: Settings, refresh_s: float = 2.0) -> None:
        self.settings, self.refresh_s = settings, refresh_s
        self.lag = LagSampler(settings, refresh_s)
        self.view = PipelineView()
        self.reader = TopicReader(settings, self.view)
        self.index = CatalogIndex(settings)
        self._lag_task: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/api/state", self.api_state)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.reader.start()
        self._lag_task = asyncio.create_task(self._sample_lag())

    async def _stop(self, app: web.Application) -> None:
        if self._lag_task:
            self._lag_task.cancel()
        await asyncio.to_thread(self.reader.stop)

    async def _sample_lag(self) -> None:
        while True:
            await asyncio.to_thread(self.lag.sample)
            await asyncio.sleep(self.refresh_s)  # the sampling period, not synchronisation

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-store"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_state(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(await asyncio.to_thread(self.state_dict)),
                            content_type="application/json")

    def state_dict(self) -> dict[str, Any]:
        """Everything the page shows, as one JSON document (also handy for scripts)."""
        pipeline = self.view.snapshot()
        names = set(pipeline["curves"]) | set(pipeline["revisions"])
        try:
            serving: dict[str, Any] = serving_state(self.index, self.settings, names)
        except Exception as exc:  # Redis down: show Kafka's half of the picture
            serving = {"policies": {}, "hot_set": [], "engines": {},
                       "error": f"{type(exc).__name__}: {exc}"}
        return {"ts": time.time(), "refresh_s": self.refresh_s,
                "topic_prefix": self.settings.topic_prefix, "lag": self.lag.snapshot(),
                "pipeline": pipeline, "serving": serving}


def run_dashboard(settings: Settings, host: str = "127.0.0.1", port: int = 8700,
                  refresh_s: float = 2.0) -> None:
    """Serve until interrupted."""
    app = Dashboard(settings, refresh_s=refresh_s).app()
    print(f"lorastream dashboard on http://{host}:{port}/ (JSON: /api/state, "
          f"Prometheus: /metrics); Ctrl-C stops", flush=True)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True,
                access_log=None)
