"""pyproj transformers are per thread and built one at a time (tileserver.transformers).

The hang they avoid (pyproj #1499: concurrent lazy PROJ builds of one shared Transformer) is rare
and cannot be provoked on demand; what is tested is the property that avoids it: no thread ever
uses a Transformer another thread built, and no two builds run at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyproj

from tileserver import transformers
from tileserver.render.georef import get_transformer
from tileserver.vector import crs as vector_crs


def _owner_of_each(get: object, workers: int = 4) -> list[tuple[int, int]]:
    """(thread id, id of the transformer it got) from several threads at once."""
    barrier = threading.Barrier(workers)

    def one(_: int) -> tuple[int, int]:
        barrier.wait()
        first = get()  # type: ignore[operator]
        assert get() is first  # type: ignore[operator]  # the same thread gets its own again
        return threading.get_ident(), id(first)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(workers)))


def test_each_thread_gets_its_own_transformer() -> None:
    for get in (lambda: transformers.transformer("EPSG:4326", "EPSG:2154"),
                lambda: get_transformer("EPSG:4326", "EPSG:2154"),
                lambda: vector_crs.transformer("EPSG:4326", "EPSG:2154")):
        seen = _owner_of_each(get)
        assert len({t for t, _ in seen}) == len(seen)
        assert len({obj for _, obj in seen}) == len(seen), "a transformer is shared between threads"


def test_builds_never_overlap(monkeypatch) -> None:
    inside = 0
    most = 0
    guard = threading.Lock()
    real = pyproj.Transformer.from_crs

    def counting(*args, **kwargs):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        try:
            threading.Event().wait(0.02)  # widen the window in which an overlap would show
            return real(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(pyproj.Transformer, "from_crs", counting)
    _owner_of_each(lambda: transformers.transformer("EPSG:3857", "EPSG:4326"), workers=6)
    assert most == 1


def test_results_match_a_transformer_built_here() -> None:
    lon = np.linspace(-5.0, 9.0, 50)
    lat = np.linspace(41.0, 51.0, 50)
    expected = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)

    def run(_: int) -> tuple[np.ndarray, np.ndarray]:
        return transformers.transformer("EPSG:4326", "EPSG:2154").transform(lon, lat)

    with ThreadPoolExecutor(4) as pool:
        for x, y in pool.map(run, range(16)):
            np.testing.assert_array_equal(x, expected[0])
            np.testing.assert_array_equal(y, expected[1])
