"""Slab pixels ↔ bytes: final ROK4 slabs and masks, decoding old slabs, and lossless work files.

A slab's pixels travel as (H, W, C) arrays of the pyramid's sample type plus an (H, W) bool mask
(True = data). Work files keep both losslessly between levels (ROK4 keeps zip "work images" for
the same reason: upper levels must not average JPEG artefacts), whatever the final compression.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np

from tileserver.rok4.codecs import decode_tile, encode_tile
from tileserver.rok4.formats import MASK_FORMAT, get_format
from tileserver.rok4.slab import build_slab, index_size, parse_index

from .errors import WriterError

_WORK_MAGIC = b"TSWORK2\n"
_WORK_HEADER = struct.Struct("<8sIIIB")  # magic, height, width, channels, float32?
MASK_DATA = 255


@dataclass(frozen=True)
class SlabLayout:
    """Everything needed to cut a slab into tiles and encode them; picklable for worker processes."""

    tiles_per_width: int
    tiles_per_height: int
    tile_width: int
    tile_height: int
    channels: int
    sample_format: str  # UINT8 or FLOAT32
    compression: str
    nodata: tuple[float, ...]

    @property
    def width(self) -> int:
        return self.tiles_per_width * self.tile_width

    @property
    def height(self) -> int:
        return self.tiles_per_height * self.tile_height

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.sample_format == "FLOAT32" else np.uint8)

    @property
    def n_tiles(self) -> int:
        return self.tiles_per_width * self.tiles_per_height

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        """A slab of nodata and its all-False mask."""
        data = np.empty((self.height, self.width, self.channels), dtype=self.dtype)
        data[...] = np.asarray(self.nodata, dtype=self.dtype)
        return data, np.zeros((self.height, self.width), dtype=bool)


@dataclass(frozen=True)
class EncodedSlab:
    """What a worker hands back for one non-empty slab."""

    data: bytes
    mask: bytes | None
    work: bytes | None
    tile_range: tuple[int, int, int, int]  # data tiles inside the slab: min_col, max_col, min_row, max_row


def _tiles(array: np.ndarray, layout: SlabLayout) -> list[np.ndarray]:
    """Row-major tiles (the slab's index order) as views."""
    th, tw = layout.tile_height, layout.tile_width
    return [
        array[r * th : (r + 1) * th, c * tw : (c + 1) * tw]
        for r in range(layout.tiles_per_height)
        for c in range(layout.tiles_per_width)
    ]


def tile_range(mask: np.ndarray, layout: SlabLayout) -> tuple[int, int, int, int] | None:
    """(min_col, max_col, min_row, max_row) of the tiles holding data, relative to the slab."""
    per_tile = mask.reshape(layout.tiles_per_height, layout.tile_height, layout.tiles_per_width,
                            layout.tile_width).any(axis=(1, 3))
    rows, cols = np.nonzero(per_tile)
    if rows.size == 0:
        return None
    return int(cols.min()), int(cols.max()), int(rows.min()), int(rows.max())


def encode_slab(data: np.ndarray, mask: np.ndarray, layout: SlabLayout, with_mask: bool,
                with_work: bool) -> EncodedSlab | None:
    """Final slab (every tile encoded, nodata where the mask says so), optional mask slab and
    work file; None when the slab holds no data at all (ROK4 does not write it)."""
    found = tile_range(mask, layout)
    if found is None:
        return None
    data = np.ascontiguousarray(data, dtype=layout.dtype)
    if not mask.all():
        np.copyto(data, np.asarray(layout.nodata, dtype=layout.dtype), where=~mask[..., None])
    tiles = [encode_tile(tile, layout.compression) for tile in _tiles(data, layout)]
    slab = build_slab(tiles, layout.tiles_per_width, layout.tiles_per_height, layout.tile_width,
                      layout.tile_height, layout.channels, layout.sample_format, layout.compression)
    mask_slab = None
    if with_mask:
        mask_fmt = get_format(MASK_FORMAT)
        mask8 = (mask.astype(np.uint8) * MASK_DATA)[..., None]
        mask_tiles = [encode_tile(tile, mask_fmt.compression) for tile in _tiles(mask8, layout)]
        mask_slab = build_slab(mask_tiles, layout.tiles_per_width, layout.tiles_per_height, layout.tile_width,
                               layout.tile_height, 1, mask_fmt.sample_format or "UINT8", mask_fmt.compression)
    work = pack_work(data, mask) if with_work else None
    return EncodedSlab(slab, mask_slab, work, found)


def decode_slab(raw: bytes, layout: SlabLayout, name: str = "") -> np.ndarray:
    """Pixels of a whole stored slab (an ancestor's, during an update)."""
    index = parse_index(raw[: index_size(layout.n_tiles)], layout.n_tiles, name)
    data, _ = layout.empty()
    th, tw = layout.tile_height, layout.tile_width
    for n, (offset, size) in enumerate(zip(index.offsets, index.sizes, strict=True)):
        if size == 0:
            continue
        r, c = divmod(n, layout.tiles_per_width)
        tile = decode_tile(raw[offset : offset + size], layout.compression, tw, th, layout.channels, layout.dtype)
        data[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
    return data


def decode_mask(raw: bytes, layout: SlabLayout, name: str = "") -> np.ndarray:
    mask_layout = SlabLayout(layout.tiles_per_width, layout.tiles_per_height, layout.tile_width,
                             layout.tile_height, 1, "UINT8", get_format(MASK_FORMAT).compression, (0,))
    return decode_slab(raw, mask_layout, name)[..., 0] != 0


def nodata_mask(data: np.ndarray, nodata: tuple[float, ...]) -> np.ndarray:
    """Data where a pixel differs from nodata on some channel: the best guess without a mask."""
    return ~np.all(data == np.asarray(nodata, dtype=data.dtype), axis=2)


def pack_work(data: np.ndarray, mask: np.ndarray) -> bytes:
    """Lossless, fast container of slab pixels and mask (zstd level 1: ~10× zlib's speed, same size)."""
    h, w, c = data.shape
    header = _WORK_HEADER.pack(_WORK_MAGIC, h, w, c, int(data.dtype == np.float32))
    pixels = imagecodecs.zstd_encode(np.ascontiguousarray(data).tobytes(), level=1)
    bits = imagecodecs.zstd_encode(np.packbits(mask, axis=None).tobytes(), level=1)
    return header + struct.pack("<Q", len(pixels)) + pixels + bits


def unpack_work(raw: bytes, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    try:
        magic, h, w, c, is_float = _WORK_HEADER.unpack_from(raw)
        if magic != _WORK_MAGIC:
            raise ValueError("bad magic")
        at = _WORK_HEADER.size
        (size,) = struct.unpack_from("<Q", raw, at)
        at += 8
        dtype = np.float32 if is_float else np.uint8
        data = np.frombuffer(imagecodecs.zstd_decode(raw[at : at + size]), dtype=dtype).reshape(h, w, c).copy()
        bits = np.frombuffer(imagecodecs.zstd_decode(raw[at + size :]), dtype=np.uint8)
        mask = np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
    except (ValueError, struct.error, imagecodecs.ZstdError) as exc:
        raise WriterError(f"{name or 'work file'}: corrupt work file ({exc}); remove the run's journal (NAME.list.partial*) and rebuild") from None
    return data, mask
