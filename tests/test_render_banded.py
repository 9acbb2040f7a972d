"""render.banded: BLAS held to one thread once a map has been resampled."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info

from tileserver.render import banded
from tileserver.render.warp import _taps, get_kernel


def test_resampling_holds_blas_to_one_thread() -> None:
    """Renders run one per worker thread; OpenBLAS's own threads would spin on the same cores."""
    planes = np.random.default_rng(0).random((40, 2, 50)).astype(np.float32)
    kernel = get_kernel("lanczos_3")
    rows, cols = np.linspace(0, 39, 33), np.linspace(0, 49, 61)
    out = banded.resample(planes, _taps(rows, 40, kernel, 40 / 33), _taps(cols, 50, kernel, 50 / 61))
    assert out.shape == (33, 2, 61)
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)
