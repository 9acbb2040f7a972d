"""Slab names: base-36 interleaved paths on disk, `<prefix>_<col>_<row>` keys on object storage."""

from __future__ import annotations

import re
from dataclasses import dataclass

B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def to_b36(value: int) -> str:
    if value < 0:
        raise ValueError(f"negative slab index {value}")
    digits = ""
    while True:
        value, rest = divmod(value, 36)
        digits = B36[rest] + digits
        if value == 0:
            return digits


def b36_path(slab_col: int, slab_row: int, depth: int = 2) -> str:
    """`(25, 195), depth 2 → 00/05/PF.tif`: digits of col and row interleaved, last `depth` pairs as folders."""
    col, row = to_b36(slab_col), to_b36(slab_row)
    width = max(depth + 1, len(col), len(row))
    col, row = col.rjust(width, "0"), row.rjust(width, "0")
    pairs = [c + r for c, r in zip(col, row, strict=True)]
    head = "".join(pairs[: width - depth])
    return "/".join([head, *pairs[width - depth :]]) + ".tif"


def b36_path_decode(path: str) -> tuple[int, int]:
    """Inverse of b36_path: even characters are the column, odd ones the row."""
    chars = path.removesuffix(".tif").replace("/", "")
    if not chars or len(chars) % 2 or any(c not in B36 for c in chars.upper()):
        raise ValueError(f"not a base-36 slab path: {path!r}")
    chars = chars.upper()
    return int(chars[0::2], 36), int(chars[1::2], 36)


def object_key(prefix: str, slab_col: int, slab_row: int) -> str:
    return f"{prefix}_{slab_col}_{slab_row}"


@dataclass(frozen=True)
class SlabName:
    kind: str  # DATA or MASK
    level: str
    col: int
    row: int


_FILE_NAME = re.compile(r"^(?:.*/)?(DATA|MASK|IMAGE)/([^/]+)/([0-9A-Z/]+\.tif)$")
_OBJECT_NAME = re.compile(r"^(?:.*[/_])?(DATA|MASK|IMG|MSK)_([^_/]+)_(\d+)_(\d+)$")
_KINDS = {"DATA": "DATA", "IMAGE": "DATA", "IMG": "DATA", "MASK": "MASK", "MSK": "MASK"}


def parse_slab_name(name: str) -> SlabName:
    """Level, slab column and row from a slab path or key (list lines, links), legacy names included."""
    match = _FILE_NAME.match(name)
    if match:
        col, row = b36_path_decode(match.group(3))
        return SlabName(_KINDS[match.group(1)], match.group(2), col, row)
    match = _OBJECT_NAME.match(name)
    if match:
        return SlabName(_KINDS[match.group(1)], match.group(2), int(match.group(3)), int(match.group(4)))
    raise ValueError(f"not a ROK4 slab name: {name!r}")
