"""`lorastream engine`: the CPU engine's HTTP server plus its residency controller.

On GPU hosts an SGLang server takes the engine's place; run the controller beside it with
`--engine-url http://sglang:30000 --no-server` so the same Redis assignment drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

from aiohttp import web

from infra.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="serve SGLang's HTTP API on the CPU and follow Redis")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--engine-id", default=None, help="default: <hostname>-<port>")
    p.add_argument("--base-model", type=Path, default=None,
                   help="base model dir (default: LORASTREAM_BASE_MODEL)")
    p.add_argument("--max-loaded-loras", type=int, default=8)
    p.add_argument("--max-loras-per-batch", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="default: LORASTREAM_LORA_RANK")
    p.add_argument("--max-concurrent-loads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="serving dtype (default: LORASTREAM_DTYPE, float32: rollout log-probs "
                        "exact for the trainer)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: LORASTREAM_DEVICE)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="intra-op threads of the model work (default: one per core)")
    p.add_argument("--no-controller", action="store_true", help="serve only; ignore Redis")
    p.add_argument("--no-server", action="store_true",
                   help="run only the controller, for an engine at --engine-url")
    p.add_argument("--engine-url", default=None, help="with --no-server: e.g. an SGLang URL")
    p.add_argument("--admin-token", default=None,
                   help="bearer token load/unload require (default: "
                        "LORASTREAM_ENGINE_ADMIN_TOKEN; unset = open, for loopback only)")
    p.set_defaults(handler=cmd_engine)


def cmd_engine(args: argparse.Namespace, settings: Settings) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args, settings))
    return 0


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from workers.serving.residency import ControllerConfig, ResidencyController

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runner = None
    url = args.engine_url or f"http://{args.host}:{args.port}"
    if not args.no_server:
        runner = await _start_server(args, settings)
        log.info("CPU engine serving SGLang's API on %s", url)
    try:
        if args.no_controller:
            await stop.wait()
            return
        engine_id = args.engine_id or f"{socket.gethostname()}-{args.port}"
        config = ControllerConfig(engine_id, url, capacity=args.max_loaded_loras,
                                  max_concurrent_loads=args.max_concurrent_loads)
        log.info("residency controller %s following Redis %s", engine_id, settings.redis_url)
        await ResidencyController(settings, config).run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _start_server(args: argparse.Namespace, settings: Settings) -> web.AppRunner:
    from workers.models.base import resolve_base
    from workers.models.registry import (
        BadTargets,
        UnsupportedArchitecture,
        check_base,
        parse_targets,
    )
    from workers.serving.cpu_engine import CpuEngine, EngineConfig
    from workers.serving.server import build_app

    base = args.base_model or settings.base_model
    if base is None:
        raise SystemExit("no base model: pass --base-model or set LORASTREAM_BASE_MODEL")
    try:  # one clear message at start-up for a base the registry does not cover
        path = resolve_base(base)
        check_base(path, settings.lora_targets)
    except (UnsupportedArchitecture, BadTargets, OSError) as exc:
        raise SystemExit(f"lorastream engine: refusing to start: {exc}") from exc
    config = EngineConfig(base_path=path, max_loaded_loras=args.max_loaded_loras,
                          max_loras_per_batch=args.max_loras_per_batch,
                          max_lora_rank=args.max_lora_rank or settings.lora_rank,
                          lora_target_modules=parse_targets(settings.lora_targets),
                          dtype=args.dtype or settings.dtype,
                          device=args.device or settings.device, num_threads=args.num_threads)
    engine = await asyncio.to_thread(CpuEngine, config)  # loads in its own model thread
    token = args.admin_token or (settings.engine_admin_token.get_secret_value()
                                 if settings.engine_admin_token else None)
    runner = web.AppRunner(build_app(engine, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    return runner
