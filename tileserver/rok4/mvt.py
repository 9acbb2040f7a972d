"""Mapbox vector tiles in ROK4 `TIFF_PBF_MVT` slabs, read at the protobuf level: features counted
and layers spliced without decoding, slabs packed (the `pbf2cache` equivalent).

The vector pyramid writer packs with it (`writer/vector_pyramid.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .slab import build_vector_slab, parse_index

MAX_TILE_FEATURES = 5000  # the platform's docs: more in a tile is "la première cause d'échec"


@functools.cache
def _counting_tile() -> Any:
    """A protobuf message class reading only what counting needs: layers (field 3) and their
    features (field 2) as raw bytes; the rest stays unparsed (upb, C: ~8× the pure-Python walk)."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    proto = descriptor_pb2.FieldDescriptorProto
    spec = descriptor_pb2.FileDescriptorProto(name="tileserver_mvt_count.proto", package="tileserver_mvt",
                                              syntax="proto2")
    layer = spec.message_type.add(name="Layer")
    layer.field.add(name="features", number=2, type=proto.TYPE_BYTES, label=proto.LABEL_REPEATED)
    tile = spec.message_type.add(name="Tile")
    tile.field.add(name="layers", number=3, type=proto.TYPE_MESSAGE, type_name=".tileserver_mvt.Layer",
                   label=proto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(spec)
    return GetMessageClass(pool.FindMessageTypeByName("tileserver_mvt.Tile"))


def count_features(tile: bytes) -> int:
    """Features in an MVT tile without decoding them: field 2 of every layer (field 3)."""
    from google.protobuf.message import DecodeError

    try:
        return sum(len(layer.features) for layer in _counting_tile().FromString(tile).layers)
    except DecodeError:
        raise ValueError("not a vector tile") from None


def layers_of(tile: bytes) -> list[tuple[str, bytes]]:
    """The tile's layers (field 3) as (name, the encoded field), in order."""
    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = tile[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, at
            shift += 7

    out, at = [], 0
    while at < len(tile):
        begin = at
        key, at = varint(at)
        if key & 7 != 2:
            raise ValueError("not a vector tile")
        length, at = varint(at)
        end = at + length
        if key >> 3 == 3:
            name, inner = "", at
            while inner < end:  # the layer's name is field 1 (string)
                k, inner = varint(inner)
                if k & 7 == 2:
                    n, inner = varint(inner)
                    if k >> 3 == 1:
                        name = tile[inner:inner + n].decode("utf-8", "replace")
                        break
                    inner += n
                elif k & 7 == 0:
                    _, inner = varint(inner)
                else:
                    inner += 8 if k & 7 == 1 else 4
            out.append((name, tile[begin:end]))
        at = end
    return out


@dataclass(frozen=True)
class SlabJob:
    """One slab to pack: its new tiles (files by index in the slab) and, in an update, the
    ancestor's slab, which tiles the update recomputes (None: all) and which layers it replaces."""

    tiles: tuple[tuple[int, str], ...]
    width: int
    height: int
    ancestor: bytes | None = None
    inside: tuple[bool, ...] | None = None
    replaced: frozenset[str] = frozenset()


def pack_slab(job: SlabJob) -> tuple[bytes | None, list[tuple[int, int]]]:
    """The slab's bytes (None when all its tiles are empty) and its crowded tiles (index, features).
    Thread-safe: the writer runs `parallelization` of them at once."""
    n = job.width * job.height
    contents = [b""] * n
    if job.ancestor is not None:
        index = parse_index(job.ancestor, n)
        old = [job.ancestor[o:o + size] if size else b"" for o, size in zip(index.offsets, index.sizes, strict=True)]
        for i, tile in enumerate(old):
            if not tile:
                continue
            if job.inside is not None and not job.inside[i]:
                contents[i] = tile  # outside the recomputed zone: the ancestor's tile
            else:  # recomputed: the ancestor's other layers stay
                contents[i] = b"".join(data for name, data in layers_of(tile) if name not in job.replaced)
    for i, path in job.tiles:
        with open(path, "rb") as f:
            contents[i] = f.read() + contents[i]
    crowded = []
    for i, tile in enumerate(contents):
        # a feature holds a geometry (spec 4.2): 7 bytes at least, so a small tile cannot be crowded
        if len(tile) > 7 * MAX_TILE_FEATURES and (features := count_features(tile)) > MAX_TILE_FEATURES:
            crowded.append((i, features))
    if not any(contents):
        return None, crowded
    return build_vector_slab(contents, job.width, job.height), crowded
