"""pyproj Transformers: one per thread, built one at a time.

A pyproj Transformer shared between threads rebuilds its PROJ object lazily in each new thread that
uses it. With pyproj 3.7 / PROJ 9.5, builds running at once in several threads have been seen to
hang in `proj_create_crs_to_crs` (pyproj issue #1499; seen here once, a render thread waiting
forever in a CI run). So a thread only ever uses transformers it built itself, and builds take one
process-wide lock: a build costs milliseconds, once per thread and CRS pair.
"""

from __future__ import annotations

import threading

from pyproj import CRS, Transformer

_BUILD = threading.Lock()
_LOCAL = threading.local()
_PER_THREAD = 256  # CRS pairs a thread keeps; a thread that sees more starts over


def transformer(source: CRS | str, target: CRS | str) -> Transformer:
    """An x/y-ordered transformer from `source` to `target`, owned by the calling thread."""
    cache: dict[tuple[str, str], Transformer] | None = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    key = (_name(source), _name(target))
    found = cache.get(key)
    if found is None:
        with _BUILD:
            found = Transformer.from_crs(source, target, always_xy=True)
        if len(cache) >= _PER_THREAD:
            cache.clear()
        cache[key] = found
    return found


def _name(crs: CRS | str) -> str:
    return crs.srs if isinstance(crs, CRS) else crs
