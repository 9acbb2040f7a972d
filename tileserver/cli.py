"""`tileserver` command line. Each command group lives beside the code it drives and registers here.

User mistakes end with one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from tileserver import __version__

# modules exposing `register(subparsers)`; each adds its own command group
COMMAND_MODULES = (
    "tileserver.cli_pyramid",
    "tileserver.server_cli",
    "tileserver.publication.cli",
    "tileserver.writer.cli",
    "tileserver.warehouse.cli",
)


class CommandError(Exception):
    """A user mistake or an unavailable resource: printed as one line, exit code 1."""


def run_async(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tileserver", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tileserver {__version__}")
    parser.add_argument("--config", help="settings file (TOML or JSON)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that command group is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        print(f"tileserver: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        # domain errors (descriptor, grid, slab, storage) are ValueError/OSError subclasses
        print(f"tileserver: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # run the imported module, not __main__, so command modules share its exception classes
    from tileserver.cli import main as _main

    sys.exit(_main())
