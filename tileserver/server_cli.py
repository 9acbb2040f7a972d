"""`tileserver serve`: run the server with uvicorn (several worker processes share one store)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from tileserver.settings import load_settings


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the tile and map server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 9000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--data-dir", help="data directory: embedded store and demo data")
    serve.add_argument("--admin-token", help="bearer token protecting /admin (prefer TILESERVER_ADMIN_TOKEN)")
    serve.add_argument("--no-demo", action="store_true", help="do not publish the demo layer")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # flags become environment so every worker process builds the same settings
    if args.config:
        os.environ["TILESERVER_CONFIG"] = args.config
    for name, value in (("data_dir", args.data_dir), ("admin_token", args.admin_token)):
        if value is not None:
            os.environ["TILESERVER_" + name.upper()] = value
    if args.no_demo:
        os.environ["TILESERVER_DEMO"] = "false"
    settings = load_settings(host=args.host, port=args.port, workers=args.workers)
    os.environ["TILESERVER_LOG_LEVEL"] = args.log_level  # every worker configures its logging from it
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(f"tileserver: serving on http://{settings.host}:{settings.port}/ (data in {settings.data_dir})")
    uvicorn.run(
        "tileserver.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=args.log_level,
        access_log=False,  # tileserver.access logs every request with its id
        timeout_graceful_shutdown=10,
    )
    return 0
