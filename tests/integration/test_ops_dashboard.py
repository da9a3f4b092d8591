"""The operator dashboard against the real stack, loaded in headless Chromium."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from kafka import KafkaProducer, TopicPartition

from infra import admin
from infra.settings import Settings
from schemas.codec import encode_event
from schemas.events import AdapterEvaluated, AdapterExported, PolicyPromoted, PolicyUpdated
from tests.support.catalog import evaluate_and_promote, record
from tests.support.kafka import commit, produce
from tests.support.processes import free_port, start_cli, stop_process
from tests.support.waiting import wait_for
from workers.catalog.writer import Catalog
from workers.serving.assignment import engine_key, register_engine

pytestmark = pytest.mark.integration

PID = "alice"
SHA = "5e" * 32
REWARDS = (0.125, 0.375, 0.625)


def _chromium() -> str:
    """Debian's `chromium` (installed by infra/dev.sh); required in CI, skipped elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (bash infra/dev.sh setup installs it)")
        pytest.skip("chromium is not installed")
    return found


def _write_pipeline(settings: Settings, redis_client: redis.Redis) -> None:
    """What a trained, exported, evaluated and promoted policy leaves in Kafka and Redis."""
    events: list[tuple[str, Any]] = [
        ("updates", PolicyUpdated(policy_id=PID, step=i + 1, loss=0.5 - i / 10, mean_reward=r,
                                  tokens=8)) for i, r in enumerate(REWARDS)]
    events += [
        ("exports", AdapterExported(policy_id=PID, revision=1, step=3, parent_revision=0,
                                    sha256=SHA, path="/a/r1", size_bytes=40960, rank=4,
                                    alpha=8.0, base_model="tiny-llama")),
        ("evaluations", AdapterEvaluated(policy_id=PID, revision=1, sha256=SHA, path="/a/r1",
                                         score=0.75, baseline_revision=0, baseline_score=0.25,
                                         prompts=4, passed=True, reason="beats r0")),
        ("promotions", PolicyPromoted(policy_id=PID, revision=1, previous_revision=0,
                                      score=0.75, sha256=SHA, path="/a/r1",
                                      serve_name=f"{PID}@1")),
    ]
    producer = KafkaProducer(**admin.client_config(settings), acks="all")
    for topic, event in events:
        producer.send(settings.topic(topic), key=PID.encode(), value=encode_event(event))
    producer.flush(timeout=30)
    producer.close()
    catalog = Catalog(settings, redis_client)
    evaluate_and_promote(catalog, PID, record(catalog, PID, SHA, step=3))
    catalog.close()
    # One serving engine holding the promoted adapter, as its controller would publish it.
    register_engine(settings, redis_client, "engine-a", "http://127.0.0.1:9")
    redis_client.zadd(engine_key(settings, "engine-a", "assigned"), {f"{PID}@1": 1.0})
    redis_client.hset(engine_key(settings, "engine-a", "states"), f"{PID}@1", "active")
    # A rollout-stage consumer group 4 records behind on interactions.
    tp = TopicPartition(settings.topic("interactions"), 0)
    produce(settings, tp, [b"{}"] * 6)
    commit(settings, f"{settings.app_id}.rollout", {tp: 2})


@pytest.fixture
def dashboard(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`lorastream dashboard` as a real process on a free port; yields its base URL."""
    port, log = free_port(), tmp_path / "dashboard.log"
    proc = start_cli(settings, log, "dashboard", "--port", str(port), "--refresh", "0.5")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, log)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.read()
    except OSError:
        return None


def _live(url: str) -> dict[str, Any] | None:
    """The API's state once it shows everything the test wrote."""
    raw = _get(f"{url}/api/state")
    if raw is None:
        return None
    s = orjson.loads(raw)
    ready = (s["lag"]["total"] == 4 and len(s["pipeline"]["curves"].get(PID, [])) == 3
             and s["pipeline"]["revisions"].get(PID, [{}])[0].get("promoted_ts")
             and s["serving"]["policies"].get(PID, {}).get("serving") == 1)
    return s if ready else None


def _chrome(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless chromium, given a second try if it hangs: a full CI run once saw
    `--screenshot` never return within 60 s while the same call takes ~1 s, and a stuck browser
    says nothing about the dashboard (what it renders is asserted on the result)."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--window-size=1280,900",
               "--virtual-time-budget=4000", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_dashboard_shows_live_figures_in_chromium(
    settings: Settings, redis_client: redis.Redis, dashboard: str, tmp_path: Path
) -> None:
    browser = _chromium()
    _write_pipeline(settings, redis_client)
    state = wait_for(lambda: _live(dashboard), timeout=30, interval=0.2,
                     message="the dashboard API to show the written pipeline")
    assert state is not None
    assert state["serving"]["hot_set"] == [f"{PID}@1"]
    assert state["serving"]["engines"] == {"engine-a": {
        "alive": True, "assigned": [f"{PID}@1"], "states": {f"{PID}@1": "active"}}}
    assert [p["mean_reward"] for p in state["pipeline"]["curves"][PID]] == list(REWARDS)
    scraped = (_get(f"{dashboard}/metrics") or b"").decode()
    assert f'lorastream_consumer_lag{{group="{settings.app_id}.rollout"' in scraped

    dom = _chrome(browser, "--dump-dom", f"{dashboard}/").stdout
    assert 'data-loaded="yes"' in dom, dom[:2000]
    assert '<b id="total-lag">4</b>' in dom
    assert '<b id="policy-count">1</b>' in dom and '<b id="revision-count">1</b>' in dom
    assert f"<span class=\"chip\">{PID}@1</span>" in dom  # the hot set
    assert f"<span class=\"chip\">{PID}@1 · active</span>" in dom  # engine-a holds it
    assert SHA[:12] in dom and "beats r0" in dom and "0.750" in dom  # revision provenance
    assert f"{PID} 0.625" in dom  # reward curve legend: last GRPO reward
    assert "<polyline" in dom  # the charts were drawn

    shot = tmp_path / "dashboard.png"
    done = _chrome(browser, f"--screenshot={shot}", f"{dashboard}/")
    assert shot.exists(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, "a screenshot with charts and tables is not a blank page"
