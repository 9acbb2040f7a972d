"""Band-by-band picture assembly against numpy's own concatenation."""

from __future__ import annotations

import numpy as np
import pytest

from tileserver.render.bands import with_alpha


@pytest.mark.parametrize("bands", [1, 2, 3])
def test_with_alpha_equals_concatenation(bands: int) -> None:
    rng = np.random.default_rng(bands)
    colour = rng.integers(0, 256, (37, 53, bands + 1), dtype=np.uint8)[..., :bands]  # strided, as maps give it
    mask = rng.random((37, 53)) < 0.3
    expected = np.concatenate([colour, np.where(mask, 0, 255).astype(np.uint8)[..., None]], axis=2)
    assert np.array_equal(with_alpha(colour, mask), expected)
    opaque = with_alpha(colour, None)
    assert np.array_equal(opaque[..., :bands], colour) and (opaque[..., -1] == 255).all()
