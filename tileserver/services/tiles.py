"""Answering a tile in the pyramid's own grid and format, whatever protocol asked (WMTS, TMS, OGC API).

A stored tile is passed through byte for byte (ROK4's content types, TIFF header for RAW/LZW/ZIP/PKB,
deflate encoding for ZIP FLOAT32). Where the slab is absent, a nodata tile of the right size in the
same format answers instead, because clients and the WMTS conformance suite expect an image inside
the advertised limits; the layer option `empty_tile_404` restores ROK4's 404.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from starlette.responses import Response

from tileserver.catalog import PublishedLayer
from tileserver.render.errors import RenderError
from tileserver.render.gate import gate_for
from tileserver.render.pipeline import render_tile
from tileserver.rok4.codecs import CodecError, encode_tile
from tileserver.rok4.formats import PyramidFormat
from tileserver.rok4.slab import NotASlabError, tiff_wrap
from tileserver.services.policy import (
    NotFound,
    check_payload,
    render_failure,
    storage_failure,
    tile_headers,
)
from tileserver.settings import Settings
from tileserver.storage import StorageError

log = logging.getLogger("tileserver.tiles")


@dataclass(frozen=True)
class TileAnswer:
    body: bytes
    content_type: str
    content_encoding: str | None
    empty: bool  # a synthesized nodata tile, not stored data


class TileNotFound(NotFound):
    """No data here and the layer asks for ROK4's 404 instead of a nodata tile."""


def _where(published: PublishedLayer, level: str, col: int, row: int) -> str:
    return f"layer {published.id} level {level} tile ({col}, {row})"


# --- stored bytes → HTTP payload ----------------------------------------------------------------


def _payload(fmt: PyramidFormat, width: int, height: int, channels: int, data: bytes) -> bytes:
    """What goes on the wire for a stored payload: itself, or behind a single-strip TIFF header."""
    if fmt.tiff_wrapped:
        return tiff_wrap(data, width, height, channels, fmt.sample_format or "UINT8", fmt.compression)
    return data


def _nodata_pixels(
    fmt: PyramidFormat, width: int, height: int, channels: int, nodata: tuple[float, ...]
) -> np.ndarray:
    """Nodata colour per channel; alpha forced to 0 so a PNG with alpha is transparent."""
    values = list(nodata) or [0.0]
    values = (
        (values * channels)[:channels] if len(values) == 1 else (values + [values[-1]] * channels)[:channels]
    )
    dtype = np.dtype(fmt.dtype)
    if dtype == np.uint8:
        values = [min(max(round(v), 0), 255) if math.isfinite(v) else 0 for v in values]
        if channels in (2, 4):
            values[-1] = 0
    return np.broadcast_to(np.asarray(values, dtype=dtype), (height, width, channels)).copy()


@functools.lru_cache(maxsize=256)
def _encoded_empty(
    fmt: PyramidFormat, width: int, height: int, channels: int, nodata: tuple[float, ...]
) -> bytes:
    """Encoded nodata tile, built once per (format, size, nodata): cheap to answer again."""
    if fmt.is_vector:
        return b""  # an MVT with no layer
    pixels = _nodata_pixels(fmt, width, height, channels, nodata)
    return _payload(fmt, width, height, channels, encode_tile(pixels, fmt.compression))


def empty_tile(published: PublishedLayer, level: str) -> TileAnswer:
    """The nodata tile of a level (any grid level, published or not); TileNotFound with empty_tile_404."""
    if published.layer.empty_tile_404:
        raise TileNotFound(f"no data in layer {published.id} at level {level}")
    matrix = published.matrix(level)
    fmt = published.format
    body = _encoded_empty(
        fmt, matrix.tile_width, matrix.tile_height, published.channels, tuple(published.nodata)
    )
    return TileAnswer(body, fmt.mime, fmt.content_encoding, True)


async def native_tile(published: PublishedLayer, level: str, col: int, row: int) -> TileAnswer | None:
    """The tile as ROK4 serves it; None outside the published limits; nodata tile where no slab."""
    if not published.in_limits(level, col, row):
        return None
    try:
        data = await published.owners[level].get_tile(level, col, row)
    except (StorageError, NotASlabError) as exc:
        raise storage_failure(exc, _where(published, level, col, row)) from exc
    if data is None:
        return empty_tile(published, level)
    fmt, matrix = published.format, published.matrix(level)
    check_payload(fmt.compression, data, _where(published, level, col, row))
    body = _payload(fmt, matrix.tile_width, matrix.tile_height, published.channels, data)
    return TileAnswer(body, fmt.mime, fmt.content_encoding, False)


def accepts_encoding(accept_encoding: str | None, coding: str) -> bool:
    """Whether a client's Accept-Encoding names `coding` (or `*`) with a non-zero quality. No header
    counts as no: RFC 9110 would allow any coding then, but a client that asked for nothing (curl
    without --compressed, a plain socket) cannot read a deflated BIL, and identity is always allowed."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in (coding, "*"):
            continue
        quality = re.search(r"q\s*=\s*([0-9.]+)", params.lower())
        try:
            return quality is None or float(quality.group(1)) > 0
        except ValueError:
            return False
    return False


def for_client(answer: TileAnswer, accept_encoding: str | None) -> TileAnswer:
    """The stored deflate stream (ZIP FLOAT32, ROK4's Content-Encoding: deflate) passed through to a
    client that accepts deflate, inflated for any other: the fast path and every route use this."""
    if answer.content_encoding != "deflate" or accepts_encoding(accept_encoding, "deflate"):
        return answer
    try:
        body = zlib.decompress(answer.body)
    except zlib.error as exc:
        raise storage_failure(CodecError(f"not a zlib stream: {exc}"), "deflated tile") from exc
    return replace(answer, body=body, content_encoding=None)


def tile_response(
    answer: TileAnswer, published: PublishedLayer, settings: Settings, accept_encoding: str | None = None
) -> Response:
    """HTTP response of a tile: its Content-Type, the headers `policy.tile_headers` gives it, and its
    body in a coding the client accepts (`accept_encoding`: the request's Accept-Encoding)."""
    answer = for_client(answer, accept_encoding)
    headers = tile_headers(published, settings, answer.content_encoding)
    return Response(answer.body, media_type=answer.content_type, headers=headers)


# --- pixel values -------------------------------------------------------------------------------


def _same(value: float, nodata: float) -> bool:
    return value == nodata or (math.isnan(value) and math.isnan(nodata))


async def feature_info(
    published: PublishedLayer, level: str, col: int, row: int, i: int, j: int
) -> list[float] | None:
    """Stored values of pixel (i, j) of a tile; None where there is no data (absent tile or nodata pixel)."""
    if published.format.is_vector or not published.in_limits(level, col, row):
        return None
    matrix = published.matrix(level)
    if not (0 <= i < matrix.tile_width and 0 <= j < matrix.tile_height):
        return None
    owner = published.owners[level]
    try:
        data = await owner.get_tile(level, col, row)
        if data is None:
            return None
        pixels = owner.decode(level, data)
    except (StorageError, NotASlabError, CodecError) as exc:
        raise storage_failure(exc, _where(published, level, col, row)) from exc
    raw = pixels[j, i, :]
    if raw.dtype == np.float32:
        values = [float(str(v)) for v in raw]  # shortest decimal that reads back as the float32
    else:
        values = [float(v) for v in raw]
    nodata = _nodata_pixels(published.format, 1, 1, published.channels, tuple(published.nodata))[0, 0]
    if published.format.dtype == "uint8" and published.channels in (2, 4):
        if values[-1] == 0:  # fully transparent: nothing there, whatever the colour
            return None
    elif all(_same(v, float(n)) for v, n in zip(values, nodata, strict=True)):
        return None
    return values


async def rendered_tile(
    runtime: Any, published: PublishedLayer, tms: Any, level: str, col: int, row: int, style: Any, mime: str
) -> TileAnswer:
    """A tile the pyramid cannot pass through (another grid, format or style), made by render/;
    shared by WMTS, TMS and OGC API Tiles so they bound and report rendering the same way."""
    try:
        body, content_type = await render_tile(
            published, tms, level, col, row, style, mime, gate=gate_for(runtime)
        )
    except RenderError as exc:
        raise render_failure(exc, _where(published, level, col, row)) from None
    return TileAnswer(body, content_type, None, False)
