"""GDAL errors raised during a pyogrio read, which pyogrio itself lets pass.

A shapefile truncated by one byte reads "successfully" through pyogrio: shapelib reports
`Error in fread() reading object …` through GDAL's error handler, pyogrio swallows it and the
feature comes back with a null geometry (ogr2ogr prints it; tippecanoe then spreads garbage). The
only place the failure is visible is GDAL's error handler, so `collect()` pushes one (GDAL handler
stacks are per thread) on pyogrio's own libgdal through ctypes and hands back what was reported.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pyogrio

CE_FAILURE = 3
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)


def _load() -> ctypes.CDLL | None:
    base = os.path.dirname(pyogrio.__file__)
    for pattern in (os.path.join(base, "..", "pyogrio.libs", "libgdal*"), os.path.join(base, ".dylibs", "libgdal*")):
        found = sorted(glob.glob(pattern))
        if found:
            return ctypes.CDLL(found[0])
    try:  # a pyogrio built against the system GDAL
        return ctypes.CDLL("libgdal.so")
    except OSError:
        return None


_LIB = _load()


@contextmanager
def collect() -> Iterator[list[str]]:
    """Within the block, GDAL failures (CE_Failure and worse) of this thread land in the yielded list."""
    errors: list[str] = []
    if _LIB is None:
        yield errors
        return

    @_HANDLER
    def handler(err_class: int, err_no: int, msg: bytes | None) -> None:
        if err_class >= CE_FAILURE:
            errors.append((msg or b"").decode("utf-8", "replace"))

    _LIB.CPLPushErrorHandler(handler)
    try:
        yield errors
    finally:
        _LIB.CPLPopErrorHandler()
        del handler  # kept alive until popped


def available() -> bool:
    """Whether GDAL's failures can be seen at all (they can with pyogrio's wheels)."""
    return _LIB is not None
