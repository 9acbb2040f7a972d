"""`tileserver pyramid info|tile`: inspect a pyramid and extract a tile as stored."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tileserver.cli import CommandError, print_json, run_async
from tileserver.pyramid import Pyramid, PyramidError, split_descriptor_url
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.slab import NotASlabError
from tileserver.settings import PACKAGE_DIR, load_settings
from tileserver.storage import Storage, StorageError

DEMO_DESCRIPTOR = str(PACKAGE_DIR / "demo" / "pyramids" / "SCAN1000.json")


def register(subparsers: Any) -> None:
    pyramid = subparsers.add_parser("pyramid", help="inspect, extract from and build ROK4 pyramids")
    commands = pyramid.add_subparsers(dest="pyramid_command", required=True)

    info = commands.add_parser("info", help="levels, limits, format, grid and extent of a pyramid")
    info.add_argument("descriptor", nargs="?", default=DEMO_DESCRIPTOR, help="path, file://… or s3://bucket/key")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_info)

    tile = commands.add_parser("tile", help="write one tile as stored, byte for byte")
    tile.add_argument("descriptor")
    tile.add_argument("level")
    tile.add_argument("col", type=int)
    tile.add_argument("row", type=int)
    tile.add_argument("-o", "--output", required=True, help="output file")
    tile.set_defaults(handler=_tile)


async def _with_pyramid(args: argparse.Namespace, action: Any) -> Any:
    settings = load_settings(getattr(args, "config", None))
    try:
        async with Storage(settings) as storage:
            pyramid = await Pyramid.open(args.descriptor, storage, tms_directory=settings.tms_directory)
            return await action(pyramid, storage)
    except (PyramidError, StorageError, NotASlabError) as exc:
        raise CommandError(str(exc)) from None


async def _slab_count(pyramid: Pyramid, storage: Storage) -> int | None:
    root, name = split_descriptor_url(pyramid.url)
    text = await storage.read_all(f"{root}/{name}.list")
    if text is None:
        return None
    try:
        return len(parse_list(text.decode()).entries)
    except ValueError:
        return None


def _info(args: argparse.Namespace) -> int:
    async def action(pyramid: Pyramid, storage: Storage) -> dict[str, Any]:
        summary = pyramid.summary()
        summary["slab_count"] = await _slab_count(pyramid, storage)
        return summary

    summary = run_async(_with_pyramid(args, action))
    if args.json:
        print_json(summary)
        return 0
    west, south, east, north = summary["wgs84_bbox"]
    print(f"pyramid     {summary['name']}  ({summary['url']})")
    print(f"format      {summary['format']}, {summary['channels']} channel(s), nodata {summary['nodata']}")
    print(f"grid        {summary['tile_matrix_set']} ({summary['crs']})")
    print(f"levels      {summary['top_level']} → {summary['bottom_level']} ({len(summary['levels'])} levels)")
    print(f"extent      {' '.join(f'{v:.3f}' for v in summary['bbox'])} ({summary['crs']})")
    print(f"wgs84       {west:.6f} {south:.6f} {east:.6f} {north:.6f}")
    if summary["slab_count"] is not None:
        print(f"slabs       {summary['slab_count']} (from the .list)")
    print("level  resolution        min_col  max_col  min_row  max_row")
    for level in summary["levels"]:
        lim = level["tile_limits"]
        print(
            f"{level['id']:>5}  {level['resolution']:<16.8g} {lim['min_col']:>8} {lim['max_col']:>8}"
            f" {lim['min_row']:>8} {lim['max_row']:>8}"
        )
    return 0


def _tile(args: argparse.Namespace) -> int:
    async def action(pyramid: Pyramid, storage: Storage) -> bytes | None:
        return await pyramid.get_tile(args.level, args.col, args.row)

    data = run_async(_with_pyramid(args, action))
    if data is None:
        raise CommandError(f"no data at level {args.level}, column {args.col}, row {args.row}")
    Path(args.output).write_bytes(data)
    return 0
