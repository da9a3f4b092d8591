"""A small reward judge over HTTP, for tests and benchmarks: the protocol of
`workers/rewards/http.py`, scoring each completion like the built-in `length` reward without
a charset (so a judge's rewards can be compared with the in-process function's), after a fixed
delay per call.

`python -m workers.reference.judge --port 8765 --delay-ms 50` serves it in its own process;
`Judge` runs it on the caller's event loop. `fail_first` answers that many calls with a 500
first; `status` answers every call with that status; `calls` and `groups` count what came in.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


def length_scores(group: dict[str, Any]) -> list[float]:
    """`workers.rewards.functions.length_reward` without a charset, in plain arithmetic: the
    judge's own work must stay small beside its fixed delay (it shares the benchmark's cores)."""
    params = group.get("task_params") or {}
    target, scale = float(params.get("target_chars", 0.0)), float(params.get("scale", 8.0))
    return [scale / (scale + abs(len(c) - target)) for c in group["completions"]]


@dataclass
class Judge:
    delay_s: float = 0.0
    fail_first: int = 0
    status: int = 200
    calls: int = 0
    groups: int = 0
    runner: web.AppRunner | None = None
    url: str = ""

    async def score(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = orjson.loads(await request.read())
        self.groups += len(body["groups"])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.calls <= self.fail_first:
            return web.Response(status=500, text="warming up")
        if self.status != 200:
            return web.Response(status=self.status, text="refused")
        scores = [length_scores(g) for g in body["groups"]]
        return web.Response(body=orjson.dumps({"scores": scores}),
                            content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/score", self.score)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}/score"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    judge = Judge(delay_s=args.delay_ms / 1000)
    web.run_app(judge.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
