"""`lorastream gateway` (the OpenAI-compatible front door) and `lorastream keys`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import orjson
from aiohttp import web

from infra.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="serve policies over OpenAI's API (chat, completions, "
                                       "models) and take feedback into training")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8800)
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on this port (0 = off)")
    p.set_defaults(handler=cmd_gateway)

    p = sub.add_parser("keys", help="API keys of the gateway, per namespace")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="a new key (printed once; only its hash is kept)")
    create.add_argument("--namespace", default="default")
    create.add_argument("--name", default="", help="a note for people, e.g. who holds it")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=cmd_keys_create)
    lst = ksub.add_parser("list", help="keys (ids, namespaces, names; never the secret)")
    lst.add_argument("--namespace")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=cmd_keys_list)
    rev = ksub.add_parser("revoke", help="revoke a key by its id")
    rev.add_argument("key_id")
    rev.set_defaults(handler=cmd_keys_revoke)


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args, settings))
    return 0


async def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from workers.serving.gateway.app import build_app
    from workers.serving.gateway.service import Gateway, GatewayStartError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(Gateway(settings)), access_log=None)
    try:
        await runner.setup()
    except GatewayStartError as exc:
        await runner.cleanup()
        raise SystemExit(f"lorastream gateway: {exc}") from None
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("gateway on http://%s:%d/v1", args.host, args.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from workers.serving.gateway.apikeys import ApiKeys

    try:
        secret, key = ApiKeys(settings).create(args.namespace, args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps({"key": secret, "key_id": key.key_id,
                            "namespace": key.namespace}).decode())
    else:
        print(secret)
        print(f"key {key.key_id} for namespace {key.namespace!r}: shown once, keep it",
              file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from workers.serving.gateway.apikeys import ApiKeys

    keys = ApiKeys(settings).list(args.namespace)
    if args.json:
        print(orjson.dumps([asdict(k) for k in keys]).decode())
        return 0
    for k in keys:
        print(f"{k.key_id}  {k.namespace:<20} {k.name}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from workers.serving.gateway.apikeys import ApiKeys

    if not ApiKeys(settings).revoke(args.key_id):
        print(f"error: no key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0
