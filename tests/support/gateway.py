"""A serving stack for gateway tests: CPU engines over HTTP, one residency controller each and
the gateway, all real (Redis, the broker, the artifact store), on a background event loop so
tests can use blocking clients (the official `openai` client, the SDK) from their own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import redis
from aiohttp import web

from infra.settings import Settings
from workers.serving.cpu_engine import CpuEngine, EngineConfig
from workers.serving.gateway.app import build_app
from workers.serving.gateway.service import Gateway
from workers.serving.residency import ControllerConfig, ResidencyController
from workers.serving.server import ServerThread

T = TypeVar("T")


def engine(base: Path, port: int = 0, slots: int = 8) -> ServerThread:
    config = EngineConfig(base_path=base, max_loaded_loras=slots, max_loras_per_batch=4,
                          max_lora_rank=4)
    return ServerThread(CpuEngine(config), port=port).start()


class ServingStack:
    """Engines (given), their controllers and a gateway at `url` (`.../v1` for OpenAI)."""

    def __init__(self, settings: Settings, engines: list[ServerThread], *,
                 probe_interval_s: float = 0.2) -> None:
        self.settings, self.engines = settings, engines
        self.probe_interval_s = probe_interval_s
        self.r = redis.Redis.from_url(settings.redis_url)
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self.gateway: Gateway | None = None
        self.controllers: list[ResidencyController] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> ServingStack:
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.r.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self._stop = asyncio.Event()
        for i, server in enumerate(self.engines):
            ctl = ResidencyController(self.settings, ControllerConfig(
                f"e{i}", server.url, capacity=8, interval_s=0.05,
                probe_interval_s=self.probe_interval_s),
                self.r)
            self.controllers.append(ctl)
            self._tasks.append(asyncio.create_task(ctl.run(self._stop)))
        self.gateway = Gateway(self.settings, self.r)
        self._runner = web.AppRunner(build_app(self.gateway), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _shutdown(self) -> None:
        assert self._stop is not None and self._runner is not None
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._runner.cleanup()

    def state(self, engine: int, name: str) -> str | None:
        item = self.controllers[engine].tracked.get(name)
        return item.state.value if item is not None else None
