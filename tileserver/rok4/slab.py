"""ROK4 slab ("dalle") layout: a tiled little-endian TIFF with a fixed 2048-byte header.

Pure byte manipulation: parsing the index a reader fetches in one ranged read, reading the
header, writing slabs byte-identical to ROK4's, and the single-strip TIFF ROK4 serves tiles in.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tileserver.rok4.codecs import normalize_compression

HEADER_SIZE = 2048
SYMLINK_SIGNATURE = b"SYMLINK#"

_TIFF_MAGIC = b"II*\x00"
_IFD_OFFSET = 16
_SHORT, _LONG = 3, 4
_TYPE_SIZES = {1: 1, 2: 1, _SHORT: 2, _LONG: 4}
_TYPE_CODES = {1: "B", 2: "B", _SHORT: "H", _LONG: "I"}

_TAG_IMAGE_WIDTH = 256
_TAG_IMAGE_LENGTH = 257
_TAG_BITS_PER_SAMPLE = 258
_TAG_COMPRESSION = 259
_TAG_PHOTOMETRIC = 262
_TAG_STRIP_OFFSETS = 273
_TAG_SAMPLES_PER_PIXEL = 277
_TAG_ROWS_PER_STRIP = 278
_TAG_STRIP_BYTE_COUNTS = 279
_TAG_TILE_WIDTH = 322
_TAG_TILE_LENGTH = 323
_TAG_TILE_OFFSETS = 324
_TAG_TILE_BYTE_COUNTS = 325
_TAG_EXTRA_SAMPLES = 338
_TAG_SAMPLE_FORMAT = 339
_TAG_YCBCR_SUBSAMPLING = 530

# TIFF Compression tag per ROK4 compression; PNG tiles claim Adobe Deflate (8) like ROK4 does.
TIFF_COMPRESSION = {"raw": 1, "lzw": 5, "jpg": 7, "jpg90": 7, "png": 8, "zip": 8, "pkb": 32773}
_PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 1, 2, 6
_EXTRASAMPLE_UNASSOCIATED_ALPHA = 2
SAMPLE_FORMATS = {"UINT8": (1, 8), "FLOAT32": (3, 32)}
"""ROK4 sample format -> (TIFF SampleFormat, bits per sample)."""


class NotASlabError(ValueError):
    """The bytes are not (or no longer) a readable ROK4 slab."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)  # both in args, so the error survives pickling
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.name or '<slab>'} is not a ROK4 slab: {self.reason}"


def index_size(n_tiles: int) -> int:
    """Bytes a reader fetches up front: header plus offsets and sizes."""
    return HEADER_SIZE + 8 * n_tiles


@dataclass(frozen=True)
class SlabIndex:
    """Where each tile lives, in slab order (row-major); size 0 means no data."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class SlabHeader:
    """What the TIFF header of a slab declares; vector slabs only have sizes and the index."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    channels: int
    bits_per_sample: tuple[int, ...]
    compression: int
    photometric: int | None
    sample_format: str
    n_tiles: int

    @property
    def tiles_per_width(self) -> int:
        return self.width // self.tile_width if self.tile_width else 1

    @property
    def tiles_per_height(self) -> int:
        return self.height // self.tile_height if self.tile_height else 1


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    type: int
    count: int
    value_at: int
    """Absolute offset of the 4-byte value field."""


def _read_ifd(data: bytes, name: str) -> dict[int, _Entry]:
    """Entries of the one IFD at offset 16, after checking it is a ROK4-shaped TIFF."""
    if len(data) < 8 or data[:4] != _TIFF_MAGIC:
        raise NotASlabError(name, "no little-endian TIFF signature")
    (ifd,) = struct.unpack_from("<I", data, 4)
    if ifd != _IFD_OFFSET:
        raise NotASlabError(name, f"IFD at offset {ifd}, expected {_IFD_OFFSET}")
    if len(data) < _IFD_OFFSET + 2:
        raise NotASlabError(name, f"truncated header ({len(data)} bytes)")
    (count,) = struct.unpack_from("<H", data, _IFD_OFFSET)
    end = _IFD_OFFSET + 2 + 12 * count + 4
    if end > HEADER_SIZE:
        raise NotASlabError(name, f"IFD of {count} entries overflows the {HEADER_SIZE}-byte header")
    if len(data) < end:
        raise NotASlabError(name, f"truncated header ({len(data)} bytes)")
    entries = {}
    for at in range(_IFD_OFFSET + 2, end - 4, 12):
        tag, kind, n = struct.unpack_from("<HHI", data, at)
        entries[tag] = _Entry(kind, n, at + 8)
    return entries


def _values(data: bytes, entry: _Entry, name: str) -> tuple[int, ...]:
    if entry.type not in _TYPE_SIZES:
        raise NotASlabError(name, f"unexpected TIFF field type {entry.type}")
    size = _TYPE_SIZES[entry.type] * entry.count
    at = entry.value_at if size <= 4 else struct.unpack_from("<I", data, entry.value_at)[0]
    if at + size > len(data):
        raise NotASlabError(name, "TIFF field points past the header")
    return struct.unpack_from(f"<{entry.count}{_TYPE_CODES[entry.type]}", data, at)


def parse_index(data: bytes, n_tiles: int, name: str = "") -> SlabIndex:
    """Tile offsets and sizes from the first ``index_size(n_tiles)`` bytes of a slab.

    Checks what a corrupt or foreign file would get wrong, cheaply: this runs on every cold slab.
    Object-storage links (``SYMLINK#…``) must be resolved by the caller first.
    """
    entries = _read_ifd(data, name)
    offsets_tag, sizes_tag = entries.get(_TAG_TILE_OFFSETS), entries.get(_TAG_TILE_BYTE_COUNTS)
    if offsets_tag is None or sizes_tag is None:
        raise NotASlabError(name, "no TileOffsets/TileByteCounts tags")
    if offsets_tag.count != n_tiles or sizes_tag.count != n_tiles:
        raise NotASlabError(name, f"header declares {offsets_tag.count} tiles, expected {n_tiles}")
    # Single-tile slabs keep the index at 2048 but point the tags inline (see build_slab).
    (offsets_at,) = struct.unpack_from("<I", data, offsets_tag.value_at)
    (sizes_at,) = struct.unpack_from("<I", data, sizes_tag.value_at)
    expected = HEADER_SIZE + 8 if n_tiles == 1 else HEADER_SIZE
    if offsets_at != expected or (n_tiles > 1 and sizes_at != HEADER_SIZE + 4 * n_tiles):
        raise NotASlabError(name, "index is not right after the 2048-byte header")
    end = index_size(n_tiles)
    if len(data) < end:
        raise NotASlabError(name, f"truncated: {len(data)} bytes, the index needs {end}")
    index = np.frombuffer(data, dtype="<u4", count=2 * n_tiles, offset=HEADER_SIZE).reshape(2, n_tiles)
    offsets, sizes = index
    if np.any((sizes > 0) & (offsets < end)):
        raise NotASlabError(name, "a tile offset points inside the header or index")
    return SlabIndex(tuple(offsets.tolist()), tuple(sizes.tolist()))


def read_header(data: bytes, name: str = "") -> SlabHeader:
    """Decode the slab's TIFF header (at least its first 2048 bytes)."""
    entries = _read_ifd(data, name)

    def get(tag: int, default: tuple[int, ...]) -> tuple[int, ...]:
        return _values(data, entries[tag], name) if tag in entries else default

    if _TAG_TILE_OFFSETS not in entries:
        raise NotASlabError(name, "no TileOffsets tag")
    tiff_format = get(_TAG_SAMPLE_FORMAT, (1,))[0]
    sample_format = next((k for k, (code, _) in SAMPLE_FORMATS.items() if code == tiff_format), None)
    if sample_format is None:
        raise NotASlabError(name, f"unsupported SampleFormat {tiff_format}")
    photometric = get(_TAG_PHOTOMETRIC, ())
    return SlabHeader(
        width=get(_TAG_IMAGE_WIDTH, (0,))[0],
        height=get(_TAG_IMAGE_LENGTH, (0,))[0],
        tile_width=get(_TAG_TILE_WIDTH, (0,))[0],
        tile_height=get(_TAG_TILE_LENGTH, (0,))[0],
        channels=get(_TAG_SAMPLES_PER_PIXEL, (1,))[0],
        bits_per_sample=get(_TAG_BITS_PER_SAMPLE, (1,)),
        compression=get(_TAG_COMPRESSION, (1,))[0],
        photometric=photometric[0] if photometric else None,
        sample_format=sample_format,
        n_tiles=entries[_TAG_TILE_OFFSETS].count,
    )


# --- writing --------------------------------------------------------------------------------


def _entry(tag: int, kind: int, count: int, value: int | tuple[int, int]) -> bytes:
    """One IFD entry; a pair of SHORTs is packed inline into the value field."""
    if isinstance(value, tuple):
        return struct.pack("<HHI2H", tag, kind, count, *value)
    if kind == _SHORT and count == 1:
        return struct.pack("<HHIH2x", tag, kind, count, value)
    return struct.pack("<HHII", tag, kind, count, value)


def _layout(sizes: Sequence[int]) -> list[int]:
    """ROK4 placement: first tile right after the index, each next one 16-byte aligned."""
    offsets, position = [], index_size(len(sizes))
    for size in sizes:
        offsets.append(position)
        position = (position + size + 15) & ~15
    return offsets


def _assemble(ifd: list[bytes], bits: int, tiles: Sequence[bytes]) -> bytes:
    """Header (padded to 2048), index, then the tiles at their ROK4 positions."""
    n = len(tiles)
    head = _TIFF_MAGIC + struct.pack("<I4H", _IFD_OFFSET, bits, bits, bits, bits)
    head += struct.pack("<H", len(ifd)) + b"".join(ifd) + b"\x00\x00\x00\x00"
    header = bytearray(head.ljust(HEADER_SIZE, b"\x00"))
    sizes = [len(tile) for tile in tiles]
    offsets = _layout(sizes)
    if n == 1:  # ROK4 overwrites byte 134 with the lone tile's size, whatever tag sits there
        struct.pack_into("<I", header, 134, sizes[0])
    # An empty last tile does not extend the file (ROK4 on FILE storage; its S3 writer would pad).
    end = max([index_size(n)] + [o + s for o, s in zip(offsets, sizes, strict=True) if s])
    out = bytearray(end)
    out[:HEADER_SIZE] = header
    out[HEADER_SIZE : index_size(n)] = struct.pack(f"<{2 * n}I", *offsets, *sizes)
    for offset, tile in zip(offsets, tiles, strict=True):
        out[offset : offset + len(tile)] = tile
    return bytes(out)


def _tile_index_entries(n_tiles: int) -> list[bytes]:
    first = HEADER_SIZE + 8 if n_tiles == 1 else HEADER_SIZE
    return [
        _entry(_TAG_TILE_OFFSETS, _LONG, n_tiles, first),
        _entry(_TAG_TILE_BYTE_COUNTS, _LONG, n_tiles, HEADER_SIZE + 4 * n_tiles),
    ]


def _check_grid(tiles: Sequence[bytes], tiles_per_width: int, tiles_per_height: int) -> None:
    if tiles_per_width < 1 or tiles_per_height < 1 or len(tiles) != tiles_per_width * tiles_per_height:
        raise ValueError(f"{len(tiles)} tiles for a {tiles_per_width}x{tiles_per_height} slab")


def _sample_format(sample_format: str) -> tuple[int, int]:
    try:
        return SAMPLE_FORMATS[sample_format.upper()]
    except KeyError:
        raise ValueError(f"unknown sample format {sample_format!r}, expected UINT8 or FLOAT32") from None


def build_slab(
    tiles: Sequence[bytes],
    tiles_per_width: int,
    tiles_per_height: int,
    tile_width: int,
    tile_height: int,
    channels: int,
    sample_format: str,
    compression: str,
) -> bytes:
    """A raster slab byte-identical to ROK4's ``Rok4Image`` output, from already encoded tiles."""
    _check_grid(tiles, tiles_per_width, tiles_per_height)
    if any(len(tile) == 0 for tile in tiles):
        raise ValueError("raster slabs cannot hold empty tiles")
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"ROK4 slabs have 1 to 4 channels, not {channels}")
    compression = normalize_compression(compression)
    tiff_format, bits = _sample_format(sample_format)
    jpeg = compression in ("jpg", "jpg90")
    if jpeg and (channels != 3 or bits != 8):
        raise ValueError("JPEG slabs hold 3-channel UINT8 data only")
    if compression == "png" and bits != 8:
        raise ValueError("PNG slabs hold UINT8 data only")

    if channels == 1:
        bits_entry = _entry(_TAG_BITS_PER_SAMPLE, _SHORT, 1, bits)
    elif channels == 2:  # ROK4 writes 8,8 inline even for float32
        bits_entry = _entry(_TAG_BITS_PER_SAMPLE, _SHORT, 2, (8, 8))
    else:  # points at the four copies of bits per sample at offset 8
        bits_entry = _entry(_TAG_BITS_PER_SAMPLE, _SHORT, channels, 8)
    if jpeg:
        photometric = _PHOTOMETRIC_YCBCR
    else:
        photometric = _PHOTOMETRIC_MINISBLACK if channels <= 2 else _PHOTOMETRIC_RGB
    ifd = [
        _entry(_TAG_IMAGE_WIDTH, _LONG, 1, tiles_per_width * tile_width),
        _entry(_TAG_IMAGE_LENGTH, _LONG, 1, tiles_per_height * tile_height),
        bits_entry,
        _entry(_TAG_COMPRESSION, _SHORT, 1, TIFF_COMPRESSION[compression]),
        _entry(_TAG_PHOTOMETRIC, _SHORT, 1, photometric),
        _entry(_TAG_SAMPLES_PER_PIXEL, _SHORT, 1, channels),
        _entry(_TAG_TILE_WIDTH, _LONG, 1, tile_width),
        _entry(_TAG_TILE_LENGTH, _LONG, 1, tile_height),
        *_tile_index_entries(len(tiles)),
    ]
    if channels in (2, 4):
        ifd.append(_entry(_TAG_EXTRA_SAMPLES, _SHORT, 1, _EXTRASAMPLE_UNASSOCIATED_ALPHA))
    ifd.append(_entry(_TAG_SAMPLE_FORMAT, _SHORT, 1, tiff_format))
    if jpeg:
        ifd.append(_entry(_TAG_YCBCR_SUBSAMPLING, _SHORT, 2, (2, 2)))
    return _assemble(ifd, bits, tiles)


def build_vector_slab(tiles: Sequence[bytes], tiles_per_width: int, tiles_per_height: int) -> bytes:
    """A TIFF_PBF_MVT slab: a TIFF used as a mere container; empty tiles mean no data."""
    _check_grid(tiles, tiles_per_width, tiles_per_height)
    ifd = [
        _entry(_TAG_IMAGE_WIDTH, _LONG, 1, 1),
        _entry(_TAG_IMAGE_LENGTH, _LONG, 1, 1),
        *_tile_index_entries(len(tiles)),
    ]
    return _assemble(ifd, 0, tiles)


def tiff_wrap(
    tile: bytes, width: int, height: int, channels: int, sample_format: str, compression: str
) -> bytes:
    """The single-strip TIFF ROK4 serves a RAW/LZW/ZIP/PKB tile as (``image/tiff``).

    Same layout as ROK4's templates for 1, 3 and 4 channels (134/146/162-byte headers); 2 channels,
    for which ROK4 has no template, get the natural extension (146 bytes, all values inline).
    """
    compression = normalize_compression(compression)
    if compression not in ("raw", "lzw", "zip", "pkb"):
        raise ValueError(f"{compression} tiles are served as they are stored, not wrapped in a TIFF")
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"cannot wrap {channels}-channel tiles")
    tiff_format, bits = _sample_format(sample_format)
    n_entries = 11 if channels in (2, 4) else 10
    arrays_at = 8 + 2 + 12 * n_entries + 4
    header_size = arrays_at + (4 * channels if channels > 2 else 0)

    def per_sample(tag: int, value: int, array_at: int) -> bytes:
        if channels == 1:
            return _entry(tag, _SHORT, 1, value)
        if channels == 2:
            return _entry(tag, _SHORT, 2, (value, value))
        return _entry(tag, _SHORT, channels, array_at)

    ifd = [
        _entry(_TAG_IMAGE_WIDTH, _LONG, 1, width),
        _entry(_TAG_IMAGE_LENGTH, _LONG, 1, height),
        per_sample(_TAG_BITS_PER_SAMPLE, bits, arrays_at),
        _entry(_TAG_COMPRESSION, _SHORT, 1, TIFF_COMPRESSION[compression]),
        _entry(_TAG_PHOTOMETRIC, _SHORT, 1, _PHOTOMETRIC_MINISBLACK if channels <= 2 else _PHOTOMETRIC_RGB),
        _entry(_TAG_STRIP_OFFSETS, _LONG, 1, header_size),
        _entry(_TAG_SAMPLES_PER_PIXEL, _SHORT, 1, channels),
        _entry(_TAG_ROWS_PER_STRIP, _LONG, 1, height),
        _entry(_TAG_STRIP_BYTE_COUNTS, _LONG, 1, len(tile)),
    ]
    if channels in (2, 4):
        ifd.append(_entry(_TAG_EXTRA_SAMPLES, _SHORT, 1, _EXTRASAMPLE_UNASSOCIATED_ALPHA))
    ifd.append(per_sample(_TAG_SAMPLE_FORMAT, tiff_format, arrays_at + 2 * channels))
    head = _TIFF_MAGIC + struct.pack("<IH", 8, len(ifd)) + b"".join(ifd) + b"\x00\x00\x00\x00"
    if channels > 2:
        head += struct.pack(f"<{2 * channels}H", *[bits] * channels, *[tiff_format] * channels)
    return head + tile
