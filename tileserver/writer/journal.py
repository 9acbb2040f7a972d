"""The run journal (`NAME.list.partial`): what is finished, so an interrupted run resumes.

One line per finished slab — written (D), empty and so not written (E), or linked to an
ancestor (L) — with its size and the tiles holding data (the descriptor's limits come from them).
It lives on the output storage (object stores cannot append, so it is rewritten, at most every
few seconds) and starts with a fingerprint of the parameters: resuming with other parameters is
refused rather than mixing two pyramids. A slab is recorded only after its files are written
(atomically), so a recorded slab is always complete; an unrecorded one is simply redone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from tileserver.storage import Storage

from .errors import WriterError

_HEADER = "# tileserver journal 1"
_DONE = "# done"
_FLUSH_SECONDS = 3.0

TileRange = tuple[int, int, int, int]  # min_col, max_col, min_row, max_row (absolute, inclusive)


@dataclass(frozen=True)
class SlabRecord:
    level: str
    col: int
    row: int
    status: str  # D written, E empty, L linked
    size: int = 0  # bytes written (data + mask)
    tiles: TileRange | None = None

    def line(self) -> str:
        tiles = " ".join(map(str, self.tiles)) if self.tiles else "- - - -"
        return f"{self.status} {self.level} {self.col} {self.row} {self.size} {tiles}"

    @classmethod
    def parse(cls, line: str) -> SlabRecord:
        status, level, col, row, size, *tiles = line.split()
        if status not in ("D", "E", "L") or len(tiles) != 4:  # not a substring test: "DE" is corrupt
            raise ValueError(line)
        limits = None if tiles[0] == "-" else tuple(int(v) for v in tiles)
        return cls(level, int(col), int(row), status, int(size), limits)  # type: ignore[arg-type]


class Journal:
    def __init__(self, storage: Storage, path: str, fingerprint: str) -> None:
        self.storage = storage
        self.path = path
        self.fingerprint = fingerprint
        self._records: dict[tuple[str, int, int], SlabRecord] = {}
        self.finished = False
        self._dirty = False
        self._last_flush = 0.0

    async def load(self, required: bool = False) -> bool:
        """Read a previous run's journal; False when there is none."""
        raw = await self.storage.read_all(self.path)
        if raw is None:
            if required:
                raise WriterError(f"{self.path}: missing (has that shard run?)")
            return False
        lines = raw.decode(errors="replace").splitlines()
        if not lines or not lines[0].startswith(_HEADER):
            raise WriterError(f"{self.path}: not a tileserver journal; remove it to start afresh")
        if lines[0].split()[-1] != self.fingerprint:
            raise WriterError(f"{self.path}: left by a run with other parameters or sources; "
                              "remove it (and the partial pyramid) to start afresh")
        for line in lines[1:]:
            if line == _DONE:
                self.finished = True
            elif line and not line.startswith("#"):
                try:
                    record = SlabRecord.parse(line)
                except ValueError:
                    continue  # a torn last line: that slab is redone
                self._records[(record.level, record.col, record.row)] = record
        return True

    def get(self, level: str, col: int, row: int) -> SlabRecord | None:
        return self._records.get((level, col, row))

    def records(self, level: str | None = None) -> Iterator[SlabRecord]:
        return (r for r in self._records.values() if level is None or r.level == level)

    def merge(self, other: Journal) -> None:
        for key, record in other._records.items():
            self._records.setdefault(key, record)
        self._dirty = True

    async def add(self, record: SlabRecord) -> None:
        self._records[(record.level, record.col, record.row)] = record
        self._dirty = True
        if time.monotonic() - self._last_flush >= _FLUSH_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        lines = [f"{_HEADER} {self.fingerprint}", *(r.line() for r in self._records.values())]
        if self.finished:
            lines.append(_DONE)
        await self.storage.write(self.path, ("\n".join(lines) + "\n").encode())
        self._dirty = False
        self._last_flush = time.monotonic()

    async def finish(self) -> None:
        self.finished = True
        await self.flush()

    async def delete(self) -> None:
        await self.storage.delete(self.path)
