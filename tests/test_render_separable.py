"""render.separable: the compiled kernel (render/_separable.c) against the exact sums of warp's taps,
against the BLAS fallback, and on bad buffers."""

from __future__ import annotations

import numpy as np
import pytest

from tileserver.render import banded, separable
from tileserver.render.warp import _taps, get_kernel

SHAPES = [  # (source rows, source cols, output rows, output cols): enlarging, reducing, mixed, tiny
    (70, 90, 83, 101),
    (97, 120, 40, 51),
    (64, 64, 96, 30),
    (3, 5, 7, 2),
]


def _axis(n_src: int, n_out: int, kernel: str, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """warp's taps for n_out pixels spread over the source from `offset` (pixel edges), some past
    its edges (clipped taps, renormalised weights)."""
    scale = (n_src - 2 * offset) / n_out
    coord = offset + (np.arange(n_out) + 0.5) * scale - 0.5
    return _taps(coord, n_src, get_kernel(kernel), scale)


def _dense(taps: tuple[np.ndarray, np.ndarray], size: int) -> np.ndarray:
    """The (N, size) float64 matrix of one axis' taps."""
    idx, w = taps
    matrix = np.zeros((idx.shape[1], size))
    np.add.at(matrix, (np.broadcast_to(np.arange(idx.shape[1]), idx.shape), idx), w.astype(np.float64))
    return matrix


def _exact(src: np.ndarray, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """float64 sums of (H, W, C): (N_rows, N_cols, C)."""
    r, c = _dense(rows, src.shape[0]), _dense(cols, src.shape[1])
    return np.einsum("yh,hwc,xw->yxc", r, src.astype(np.float64), c)


def test_the_compiled_kernel_was_built() -> None:
    """The install compiles render/_separable.c (README); without it maps fall back to BLAS, 2× the CPU."""
    assert separable.compiled()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", ["lanczos_3", "bicubic", "linear", "nn"])
def test_pictures_are_the_rounded_exact_sums(shape: tuple[int, int, int, int], channels: int, kernel: str) -> None:
    """uint8 in, uint8 out: the float64 sums of warp's taps rounded half to even and clipped to 0..255,
    give or take one level where float32 sums fall on the other side of a .5."""
    h, w, oh, ow = shape
    src = np.random.default_rng(h * w + channels).integers(0, 256, (h, w, channels), dtype=np.uint8)
    rows, cols = _axis(h, oh, kernel, offset=0.7), _axis(w, ow, kernel, offset=-0.4)
    out = separable.resample_picture(src, rows, cols)
    exact = np.clip(np.rint(_exact(src, rows, cols)), 0, 255)
    assert out.dtype == np.uint8 and out.shape == (oh, ow, channels)
    diff = np.abs(out.astype(np.float64) - exact)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01
    # the overshoots of Lanczos on noise are clipped, not wrapped
    assert (out[exact == 255] >= 254).all() and (out[exact == 0] <= 1).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("planes", [1, 3, 4, 5, 9])
def test_float_planes_are_the_exact_sums(shape: tuple[int, int, int, int], planes: int) -> None:
    """(H, P, W) float32 planes, any number of them (groups of four and a rest), to float32 rounding."""
    h, w, oh, ow = shape
    src = (np.random.default_rng(planes).random((h, planes, w)) * 255).astype(np.float32)
    rows, cols = _axis(h, oh, "lanczos_3", offset=1.5), _axis(w, ow, "lanczos_3")
    out = separable.resample(src, rows, cols)
    exact = _exact(src.transpose(0, 2, 1), rows, cols).transpose(0, 2, 1)
    assert out.dtype == np.float32 and out.shape == (oh, planes, ow)
    assert np.abs(out - exact).max() < 1e-3
    assert np.abs(banded.resample(src, rows, cols) - out).max() < 1e-3


def test_precise_sums_keep_the_slopes_of_data_far_from_zero() -> None:
    """A plane rising 0.01 a pixel 1e6 above 0: float32 sums are off by ~0.06 (more than a step),
    double ones keep every step."""
    h, w = 60, 80
    src = (1e6 + 0.01 * np.arange(w, dtype=np.float64))[None, None, :].repeat(h, 0).astype(np.float32)
    rows, cols = _axis(h, 70, "lanczos_3"), _axis(w, 93, "lanczos_3")
    exact = _exact(src.transpose(0, 2, 1), rows, cols).transpose(0, 2, 1)
    precise = separable.resample(src, rows, cols, precise=True)
    # the only error left is the output's own float32 rounding (half a step of 0.0625 at 1e6)
    assert np.abs(precise - exact).max() <= 0.0625 / 2 + 1e-9


def test_a_map_sized_picture_matches_the_blas_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same resize with the extension switched off (what an install without a compiler runs)."""
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    rows, cols = _axis(300, 350, "lanczos_3"), _axis(280, 333, "lanczos_3")
    compiled = separable.resample_picture(src, rows, cols)
    monkeypatch.setattr(separable, "_compiled", None)
    assert not separable.compiled()
    fallback = separable.resample_picture(src, rows, cols)
    assert np.abs(compiled.astype(int) - fallback).max() <= 1


def test_bad_buffers_raise_instead_of_reading_past_them() -> None:
    """Sizes and indices are checked in C before any read: a ValueError, never a crash."""
    from tileserver.render import _separable

    src = np.zeros((4, 5, 3), dtype=np.uint8)
    idx = np.zeros((2, 2), dtype=np.int32)
    w = np.full((2, 2), 0.5, dtype=np.float32)
    out = np.empty((2, 2, 3), dtype=np.uint8)
    _separable.resample_u8(src, 4, 5, 3, idx, w, 2, idx, w, 2, out)
    with pytest.raises(ValueError, match="outside"):
        _separable.resample_u8(src, 4, 5, 3, idx + 4, w, 2, idx, w, 2, out)
    with pytest.raises(ValueError, match="outside"):
        _separable.resample_u8(src, 4, 5, 3, idx, w, 2, idx - 1, w, 2, out)
    with pytest.raises(ValueError, match="sizes"):
        _separable.resample_u8(src, 4, 6, 3, idx, w, 2, idx, w, 2, out)
    with pytest.raises(ValueError, match="sizes"):
        _separable.resample_u8(src, 4, 5, 3, idx, w, 2, idx, w, 2, np.empty((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="tap"):  # no taps: refused before any division by the count
        _separable.resample_u8(src, 4, 5, 3, idx[:, :0], w[:, :0], 0, idx, w, 2, out)
    with pytest.raises(ValueError, match="channels"):
        _separable.resample_u8(np.zeros((4, 5, 5), dtype=np.uint8), 4, 5, 5, idx, w, 2, idx, w, 2, out)
    with pytest.raises(TypeError):
        _separable.resample_u8(src, 4, 5, 3, idx, w, 2, idx, w, 2, out.tobytes())  # read-only output
    planes = np.zeros((4, 2, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="sizes"):
        _separable.resample_f32(planes, 4, 2, 5, idx, w, 2, idx, w, 2, np.empty((2, 2, 3), dtype=np.float32), False)


@pytest.mark.parametrize("has_mask", [True, False])
@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255), (12, 200, 7)])
@pytest.mark.parametrize("min_coverage", [0.5, 0.3, 1.0])
def test_the_fused_finish_gives_numpy_s_bytes(monkeypatch: pytest.MonkeyPatch, has_mask: bool,
                                              fill: tuple[int, int, int], min_coverage: float) -> None:
    """warp._finish on row-planar uint8 sums: the compiled pass (division by the coverage, validity,
    rounding, clipping, fill, interleaving) equals numpy's steps byte for byte, validity included —
    with sums on .5 exactly, overshoots past 0..255 and coverages around the threshold."""
    from tileserver.render import warp

    rng = np.random.default_rng(len(fill) + int(has_mask) + int(10 * min_coverage))
    h, w, channels = 37, 53, 3
    coverage = rng.choice(np.array([0.0, 0.25, 0.4999999, 0.5, 0.5000001, 0.75, 1.0], dtype=np.float32), (h, w))
    values = rng.integers(-40, 300, (h, channels, w)).astype(np.float32) + rng.choice([0.0, 0.5, 0.25], (h, channels, w))
    planes = np.empty((h, channels + has_mask, w), dtype=np.float32)
    planes[:, :channels] = values * (coverage[:, None, :] if has_mask else 1.0)
    if has_mask:
        planes[:, channels] = coverage
    inside = rng.random((h, w)) > 0.1
    fill_values = np.asarray(fill, dtype=np.float64)

    def finish() -> tuple[np.ndarray, np.ndarray]:
        view = planes.copy().transpose(0, 2, 1)  # (H, W, P) seen row-planar, as warp hands it over
        return warp._finish(view, inside, has_mask, channels, np.dtype(np.uint8), fill_values, min_coverage)

    fused, fused_valid = finish()
    monkeypatch.setattr(separable, "_compiled", None)
    slow, slow_valid = finish()
    assert fused.dtype == np.uint8 and fused.shape == (h, w, channels)
    assert np.array_equal(fused_valid, slow_valid) and np.array_equal(fused, slow)
    assert (fused[~fused_valid] == np.asarray(fill, dtype=np.uint8)).all()
    assert fused_valid.any() and not fused_valid.all()


@pytest.mark.parametrize("with_valid", [True, False])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_planes_of_a_mosaic_window_equal_numpy_s(monkeypatch: pytest.MonkeyPatch, with_valid: bool, channels: int) -> None:
    """warp._planes of a uint8 crop of a larger mosaic (read where it lies, bands dropped from the
    right as a style reading 3 of 4 does): the compiled copy equals numpy's, premultiplied by the
    validity, validity plane last."""
    from tileserver.render import warp

    rng = np.random.default_rng(channels)
    mosaic = rng.integers(0, 256, (90, 110, 4), dtype=np.uint8)
    part = mosaic[7:80, 13:101, :channels]
    valid = rng.random(part.shape[:2]) > 0.3 if with_valid else None
    compiled = warp._planes(part, valid, planar=True)
    monkeypatch.setattr(separable, "_compiled", None)
    numpy_planes = warp._planes(part, valid, planar=True)
    assert compiled.shape == numpy_planes.shape == (73, 88, channels + with_valid)
    assert warp._row_planar(compiled) and np.array_equal(compiled, numpy_planes)


def _three_steps(part: np.ndarray, valid: np.ndarray | None, rows: tuple[np.ndarray, np.ndarray],
                 cols: tuple[np.ndarray, np.ndarray], inside: np.ndarray, threshold: float,
                 fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What warp did before `warp_u8`: planes of the window, their sums, then the finish."""
    planes = separable.planes_u8(part, valid)
    assert planes is not None
    sums = separable.resample(planes, rows, cols)
    done = separable.finish_u8(sums, inside, valid is not None, part.shape[2], threshold, fill)
    assert done is not None
    return done


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("kernel", ["lanczos_3", "lanczos_2", "linear"])
@pytest.mark.parametrize("with_valid", [True, False])
def test_the_fused_warp_gives_the_three_steps_bytes(shape: tuple[int, int, int, int], channels: int, kernel: str,
                                                    with_valid: bool) -> None:
    """warp_u8 (source rows made planes once, in a small cache; each output row summed and
    finished from one line) equals planes_u8 → resample → finish_u8 byte for byte, validity too,
    on a window of a larger mosaic with bands dropped from the right."""
    h, w, oh, ow = shape
    rng = np.random.default_rng(h + w + channels + with_valid)
    mosaic = rng.integers(0, 256, (h + 9, w + 7, 4), dtype=np.uint8)
    part = mosaic[4:4 + h, 3:3 + w, :channels]
    valid = rng.random((h, w)) > 0.3 if with_valid else None
    rows, cols = _axis(h, oh, kernel, offset=0.7), _axis(w, ow, kernel, offset=-0.4)
    inside = rng.random((oh, ow)) > 0.05
    fill = np.arange(channels, dtype=np.uint8) * 40 + 3
    fused = separable.warp_u8(part, valid, rows, cols, inside, 0.4999, fill)
    assert fused is not None
    out, good = fused
    want, want_good = _three_steps(part, valid, rows, cols, inside, 0.4999, fill)
    assert out.shape == (oh, ow, channels) and np.array_equal(good, want_good) and np.array_equal(out, want)
    if with_valid and oh * ow > 100:
        assert good.any() and not good.all()


def test_the_fused_warp_takes_taps_in_any_order() -> None:
    """The row cache holds whatever rows the taps name, in any order and repeated: random taps
    (not the consecutive ones warp makes) give the three steps' bytes."""
    rng = np.random.default_rng(7)
    part = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    valid = rng.random((50, 40)) > 0.2
    for taps in (1, 3, 5, 8):
        rows = (rng.integers(0, 50, (taps, 61)), rng.random((taps, 61)).astype(np.float32))
        cols = (rng.integers(0, 40, (taps, 33)), rng.random((taps, 33)).astype(np.float32))
        inside = np.ones((61, 33), dtype=bool)
        fill = np.array([1, 2, 3], dtype=np.uint8)
        fused = separable.warp_u8(part, valid, rows, cols, inside, 0.3, fill)
        assert fused is not None
        want = _three_steps(part, valid, rows, cols, inside, 0.3, fill)
        assert np.array_equal(fused[1], want[1]) and np.array_equal(fused[0], want[0])


def test_the_fused_warp_refuses_bad_buffers() -> None:
    """warp_u8's window, validity, taps and outputs are checked in C before any read."""
    from tileserver.render import _separable

    src = np.zeros((4, 5, 3), dtype=np.uint8)
    idx = np.zeros((2, 2), dtype=np.int32)
    w = np.full((2, 2), 0.5, dtype=np.float32)
    inside = np.ones((2, 2), dtype=bool)
    fill = np.zeros(3, dtype=np.uint8)

    def call(**change: object) -> None:
        args: dict[str, object] = dict(base=src.reshape(-1), offset=0, row_stride=15, step=3, height=4, width=5,
                                       channels=3, valid=b"", ri=idx, rw=w, rt=2, ci=idx, cw=w, ct=2, inside=inside,
                                       threshold=0.5, fill=fill, out=np.empty((2, 2, 3), dtype=np.uint8),
                                       good=np.empty((2, 2), dtype=bool))
        args.update(change)
        _separable.warp_u8(*args.values())

    call()
    for change in ({"offset": 1}, {"row_stride": 16}, {"height": 5}, {"step": 2}, {"channels": 5},
                   {"valid": np.ones(19, dtype=bool)}, {"fill": fill[:2]}, {"inside": inside[:1]},
                   {"out": np.empty((2, 3, 3), dtype=np.uint8)}, {"good": np.empty((3, 2), dtype=bool)}):
        with pytest.raises(ValueError, match="sizes"):
            call(**change)
    with pytest.raises(ValueError, match="outside"):
        call(ri=idx + 4)
    with pytest.raises(ValueError, match="tap"):
        call(ri=idx[:, :0], rw=w[:, :0], rt=0)
