"""`tileserver pyramid build|harvest|update`: the writer's commands, added to the `pyramid` group.

Errors a user can fix (bad image, CRS, grid, levels, area, storage) end as one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tileserver.cli import CommandError, print_json
from tileserver.settings import load_settings

from .errors import WriterError
from .options import BuildOptions, parse_numbers
from .progress import Progress
from .summary import format_summary


def _pyramid_commands(subparsers: Any) -> Any:
    """The sub-commands action of the existing `pyramid` group (created here if absent)."""
    parser = subparsers.choices.get("pyramid")
    if parser is None:
        parser = subparsers.add_parser("pyramid", help="inspect, extract from and build ROK4 pyramids")
        return parser.add_subparsers(dest="pyramid_command", required=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="pyramid_command", required=True)


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return k, n


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="storage root: a directory, file://… or s3://bucket[/prefix]")
    parser.add_argument("--name", required=True, help="pyramid name: writes ROOT/NAME.json, ROOT/NAME.list, ROOT/NAME/")
    parser.add_argument("--parallelization", type=int, default=1, help="worker processes for the pixel work")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pyramid of that name")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _pixel_arguments(parser: argparse.ArgumentParser, harvest: bool = False) -> None:
    parser.add_argument("--tms", default="PM", help="tile matrix set id (a file of the TMS directory)")
    parser.add_argument("--bottom", required=harvest, help="bottom level (default: nearest the sources' resolution)")
    parser.add_argument("--top", help="top level (default: the grid's top)")
    parser.add_argument("--compression", default="raw", help="raw, jpg, jpg90, png, zip, lzw or pkb")
    parser.add_argument("--interpolation", default="bicubic", help="nn, linear, bicubic or lanczos")
    parser.add_argument("--width", type=int, default=16, help="tiles per slab, across")
    parser.add_argument("--height", type=int, default=16, help="tiles per slab, down")
    parser.add_argument("--nodata", help="output nodata, one value per channel (e.g. 255,255,255)")
    parser.add_argument("--samplesperpixel", type=int, help="output channels, 1 to 4")
    parser.add_argument("--sampleformat", help="UINT8 or FLOAT32")
    parser.add_argument("--mask", action="store_true", help="also write mask slabs (TIFF_ZIP_UINT8)")
    parser.add_argument("--upper-filter", default="auto", choices=("auto", "nn", "average"),
                        help="upper levels: auto = ROK4 (2x2 mean on quad-trees, nearest elsewhere), "
                        "nn, or average (area mean, any grid)")
    parser.add_argument("--shard", type=_shard, help="compute share K of N of the bottom level (0-based K)")
    parser.add_argument("--finish", type=int, metavar="N",
                        help="finishing step after N shards: upper levels, .list and descriptor")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="with --finish: wait that long for the shards to end")


def register(subparsers: Any) -> None:
    commands = _pyramid_commands(subparsers)

    build = commands.add_parser("build", help="build a pyramid from georeferenced images")
    build.add_argument("sources", nargs="+", help="TIFF/GeoTIFF, or JPEG/PNG with a world file")
    _output_arguments(build)
    _pixel_arguments(build)
    build.add_argument("--srs", help="CRS of the sources when the files do not say (EPSG:…, IGNF:…)")
    build.add_argument("--srcnodata", help="nodata of the sources when the files do not say")
    build.set_defaults(handler=_build)

    harvest = commands.add_parser("harvest", help="build a pyramid by harvesting a WMS")
    _output_arguments(harvest)
    _pixel_arguments(harvest, harvest=True)
    harvest.add_argument("--harvest-url", required=True, help="WMS endpoint")
    harvest.add_argument("--harvest-layers", required=True, help="LAYERS, comma-separated")
    harvest.add_argument("--harvest-format", required=True, help="image/png, image/jpeg, image/tiff…, image/x-bil;bits=32")
    harvest.add_argument("--harvest-area", required=True, help="WKT polygon in EPSG:4326, longitude first")
    harvest.add_argument("--harvest-levels", required=True, help="levels harvested directly, comma-separated")
    harvest.add_argument("--harvest-dimensions", help="max GetMap size W,H (must divide the slab's pixel size)")
    harvest.add_argument("--harvest-extras", default="", help="extra query parameters (key=value&…)")
    harvest.add_argument("--harvest-threshold", type=int, default=0,
                         help="harvested slabs smaller than this many bytes are empty")
    harvest.add_argument("--harvest-style", default="", help="STYLES of the GetMap requests")
    harvest.add_argument("--harvest-timeout", type=float, default=60.0, help="seconds per GetMap")
    harvest.add_argument("--harvest-retries", type=int, default=5, help="retries of a failed GetMap")
    harvest.set_defaults(handler=_harvest)

    update = commands.add_parser("update", help="new pyramid = an existing one + new images (update by reference)")
    update.add_argument("sources", nargs="+", help="new images")
    update.add_argument("--from", dest="ancestor", required=True, help="descriptor of the pyramid to update")
    _output_arguments(update)
    update.add_argument("--interpolation", help="default: the ancestor's")
    update.add_argument("--srs", help="CRS of the sources when the files do not say")
    update.add_argument("--srcnodata", help="nodata of the sources when the files do not say")
    update.set_defaults(handler=_update)


def _options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        tms=args.tms, bottom=args.bottom, top=args.top, compression=args.compression,
        interpolation=args.interpolation, width=args.width, height=args.height,
        nodata=parse_numbers(args.nodata, "--nodata") if args.nodata else None,
        samplesperpixel=args.samplesperpixel, sampleformat=args.sampleformat, mask=args.mask,
        parallelization=args.parallelization, upper_filter=args.upper_filter,
        srs=getattr(args, "srs", None),
        srcnodata=parse_numbers(args.srcnodata, "--srcnodata") if getattr(args, "srcnodata", None) else None,
    )


def _progress(args: argparse.Namespace) -> Progress:
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    return Progress(enabled=not args.quiet)


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.json:
        print_json(summary)
    elif "type_infos" in summary:
        print(format_summary(summary))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _run(args: argparse.Namespace, action: Any) -> int:
    from .build import run_with_storage

    settings = load_settings(getattr(args, "config", None))
    try:
        summary = run_with_storage(settings, action)
    except WriterError as exc:
        raise CommandError(str(exc)) from None
    return _report(args, summary)


def _sharding(args: argparse.Namespace) -> dict[str, Any]:
    if args.shard is not None and args.finish is not None:
        raise CommandError("--shard and --finish are separate runs; give one of them")
    return {"shard": args.shard, "finish": args.finish, "wait": args.wait}


def _build(args: argparse.Namespace) -> int:
    from .build import build_async

    try:
        options = _options(args)
    except WriterError as exc:
        raise CommandError(str(exc)) from None
    kwargs = _sharding(args)
    progress = _progress(args)
    return _run(args, lambda storage, s: build_async(
        args.sources, args.output, args.name, options, storage, tms_directory=s.tms_directory,
        overwrite=args.overwrite, progress=progress, **kwargs))


def _harvest(args: argparse.Namespace) -> int:
    from .harvest import HarvestOptions, harvest_async

    try:
        options = _options(args)
        harvest = HarvestOptions.from_text(
            url=args.harvest_url, layers=args.harvest_layers, format=args.harvest_format,
            area=args.harvest_area, levels=args.harvest_levels, dimensions=args.harvest_dimensions,
            extras=args.harvest_extras, threshold=args.harvest_threshold, style=args.harvest_style,
            timeout=args.harvest_timeout, retries=args.harvest_retries)
    except WriterError as exc:
        raise CommandError(str(exc)) from None
    kwargs = _sharding(args)
    progress = _progress(args)
    return _run(args, lambda storage, s: harvest_async(
        harvest, args.output, args.name, options, storage, tms_directory=s.tms_directory,
        overwrite=args.overwrite, progress=progress, **kwargs))


def _update(args: argparse.Namespace) -> int:
    from .update import UpdateOptions, update_async

    try:
        options = UpdateOptions(
            interpolation=args.interpolation, parallelization=args.parallelization, srs=args.srs,
            srcnodata=parse_numbers(args.srcnodata, "--srcnodata") if args.srcnodata else None)
    except WriterError as exc:
        raise CommandError(str(exc)) from None
    progress = _progress(args)
    return _run(args, lambda storage, s: update_async(
        args.ancestor, args.sources, args.output, args.name, options, storage, tms_directory=s.tms_directory,
        overwrite=args.overwrite, progress=progress))
