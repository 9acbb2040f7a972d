"""Tile codecs: round trips, ROK4 byte layouts, corrupt payloads."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from tileserver.rok4.codecs import COMPRESSIONS, CodecError, decode_tile, encode_tile, normalize_compression

DATA = Path(__file__).parent / "data"
ORTHOHR = DATA / "slabs" / "ORTHOHR.tif"

LOSSLESS = ("raw", "zip", "lzw", "pkb")
LAYOUTS = [(np.uint8, 1), (np.uint8, 2), (np.uint8, 3), (np.uint8, 4), (np.float32, 1)]
CASES = [
    *[(c, dt, ch) for c in LOSSLESS for dt, ch in LAYOUTS],
    *[("png", np.uint8, ch) for ch in (1, 2, 3, 4)],
    ("jpg", np.uint8, 3),
    ("jpg90", np.uint8, 3),
]


def sample_tile(height: int, width: int, channels: int, dtype: type, seed: int = 0) -> np.ndarray:
    """Smooth gradients (so JPEG stays close) with noisy and constant patches (exercises runs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x + 2 * y + 30 * c) % 256 for c in range(channels)]
    tile = np.stack(planes, axis=-1).astype(np.float64)
    tile[: height // 4, : width // 4] = 7
    if dtype == np.float32:
        tile = tile * 12.5 - 99999 * (tile == 7)
        tile[height // 2 :, width // 2 :] = rng.normal(300, 50, (height - height // 2, width - width // 2, 1))
    else:
        tile[height // 2 :, : width // 4] = rng.integers(0, 256, (height - height // 2, width // 4, channels))
    return tile.astype(dtype)


def jpeg_segments(data: bytes) -> dict[int, list[bytes]]:
    """Marker segments before the scan data, by marker."""
    segments: dict[int, list[bytes]] = {}
    pos = 2
    while data[pos + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segments.setdefault(data[pos + 1], []).append(data[pos + 4 : pos + 2 + length])
        pos += 2 + length
    return segments


def fixture_jpeg_tiles() -> list[bytes]:
    with tifffile.TiffFile(ORTHOHR) as tif:
        page = tif.pages[0]
        raw = ORTHOHR.read_bytes()
        return [raw[o : o + n] for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]


@pytest.mark.parametrize(("compression", "dtype", "channels"), CASES)
def test_round_trip(compression: str, dtype: type, channels: int) -> None:
    pixels = sample_tile(48, 40, channels, dtype)
    data = encode_tile(pixels, compression)
    decoded = decode_tile(data, compression, 40, 48, channels, dtype)
    assert decoded.shape == (48, 40, channels)
    assert decoded.dtype == np.dtype(dtype)
    if compression.startswith("jpg"):
        error = np.abs(decoded.astype(int) - pixels.astype(int))
        smooth = error[:24, 16:]  # away from the constant and noisy patches
        assert smooth.mean() < 2 and smooth.max() <= 8
    else:
        np.testing.assert_array_equal(decoded, pixels)


def test_float32_is_stored_little_endian() -> None:
    pixels = np.array([[[1.5]], [[-2.0]]], dtype=">f4")
    assert encode_tile(pixels, "raw") == struct.pack("<2f", 1.5, -2.0)


def test_png_layout_is_rok4s() -> None:
    pixels = sample_tile(32, 24, 2, np.uint8)
    data = encode_tile(pixels, "png")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack_from(">I", data, pos + 8 + length)[0] == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        pos += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert chunks[0][1] == struct.pack(">IIBBBBB", 24, 32, 8, 4, 0, 0, 0)
    rows = np.concatenate([np.zeros((32, 1), np.uint8), pixels.reshape(32, -1)], axis=1)
    assert chunks[1][1] == zlib.compress(rows.tobytes(), 5)
    assert data.endswith(bytes.fromhex("0000000049454e44ae426082"))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_decodes_like_pillow(channels: int) -> None:
    pixels = sample_tile(20, 30, channels, np.uint8)
    data = encode_tile(pixels, "png")
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (30, 20)
        assert len(image.getbands()) == channels
        pillow = np.asarray(image).reshape(20, 30, channels)
    np.testing.assert_array_equal(decode_tile(data, "png", 30, 20, channels, np.uint8), pillow)


def test_png_with_filters_falls_back_to_pillow() -> None:
    pixels = sample_tile(40, 40, 3, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    np.testing.assert_array_equal(decode_tile(buffer.getvalue(), "png", 40, 40, 3, np.uint8), pixels)


def test_jpeg_matches_rok4_fixture_tables() -> None:
    """Our q75 tiles carry the very JFIF/DQT/SOF/DHT bytes libjpeg wrote in a real ROK4 slab."""
    tile = fixture_jpeg_tiles()[0]
    ours = encode_tile(decode_tile(tile, "jpg", 20, 20, 3, np.uint8), "jpg")
    assert ours.startswith(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00") and ours.endswith(b"\xff\xd9")
    assert ours[: ours.index(b"\xff\xda")] == tile[: tile.index(b"\xff\xda")]
    luminance = jpeg_segments(ours)[0xDB][0][1:]  # stored in zigzag order
    assert [luminance[i] for i in (0, 1, 5, 6)] == [8, 6, 5, 8]  # IJG q75: first row starts 8,6,5,8


@pytest.mark.parametrize(("compression", "quality"), [("jpg", 75), ("jpg90", 90)])
def test_jpeg_tables_match_libjpeg_quality(compression: str, quality: int) -> None:
    pixels = sample_tile(32, 32, 3, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=2)
    ours, pillow = jpeg_segments(encode_tile(pixels, compression)), jpeg_segments(buffer.getvalue())
    assert ours[0xDB] == pillow[0xDB]
    assert ours[0xC0] == pillow[0xC0]  # baseline, 4:2:0


def test_fixture_jpeg_tiles_decode_like_pillow() -> None:
    for tile in fixture_jpeg_tiles():
        with Image.open(io.BytesIO(tile)) as image:
            pillow = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decode_tile(tile, "jpg", 20, 20, 3, np.uint8), pillow)


def test_stream_headers() -> None:
    pixels = sample_tile(16, 16, 1, np.uint8)
    assert encode_tile(pixels, "zip")[:2] == b"\x78\x9c"
    assert encode_tile(pixels, "lzw")[0] == 0x80  # ClearCode 256 first: ROK4's decoder needs it
    assert encode_tile(pixels, "raw") == pixels.tobytes()


def rok4_packbits_row(row: bytes) -> bytes:
    """Reference for ROK4's PkbCompressor: runs of 2+ always replicated (split 128,…,r; r == 1 is a
    literal), the last byte never joins a run, single bytes chained into literals of at most 128."""
    tokens, i = [], 0
    while i < len(row):
        j = i + 1
        while j < len(row) - 1 and row[j] == row[i]:
            j += 1
        count = j - i
        while count > 128:
            tokens.append((128, row[i]))
            count -= 128
        tokens.append((count, row[i]))
        i = j
    out, literal_at = bytearray(), None
    for count, value in tokens:
        if count > 1:
            out += bytes([257 - count, value])
            literal_at = None
            continue
        if literal_at is None or out[literal_at] == 127:
            literal_at = len(out)
            out.append(0)
        else:
            out[literal_at] += 1
        out.append(value)
    return bytes(out)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (b"\x07" * 12, "f6070007"),  # last byte kept out of the run
        (b"abccde", "016162ff63016465"),  # a 2-byte repeat breaks the literal
        (b"a" * 129, "81610061"),
        (b"a" * 257, "816181610061"),
        (b"z", "007a"),
    ],
)
def test_packbits_rok4_quirks(row: bytes, expected: str) -> None:
    pixels = np.frombuffer(row, np.uint8).reshape(1, -1, 1)
    assert encode_tile(pixels, "pkb").hex() == expected
    assert rok4_packbits_row(row).hex() == expected


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=24).filter(lambda s: s[2] <= 4),
        elements=st.integers(0, 3) | st.integers(0, 255),
    )
)
def test_packbits_matches_rok4_reference(pixels: np.ndarray) -> None:
    data = encode_tile(pixels, "pkb")
    assert data == b"".join(rok4_packbits_row(row.tobytes()) for row in pixels.reshape(pixels.shape[0], -1))
    assert imagecodecs.packbits_decode(data) == pixels.tobytes()


def test_packbits_long_rows_and_runs() -> None:
    rows = np.zeros((3, 700), np.uint8)
    rows[0, ::2] = 1
    rows[1, 300:] = np.arange(400) % 256
    expected = b"".join(rok4_packbits_row(row.tobytes()) for row in rows)
    assert encode_tile(rows.reshape(3, 700, 1), "pkb") == expected


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(LOSSLESS + ("png",)),
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**32 - 1),
)
def test_lossless_round_trip_property(
    compression: str, channels: int, height: int, width: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, rng.integers(1, 257), (height, width, channels)).astype(np.uint8)
    data = encode_tile(pixels, compression)
    np.testing.assert_array_equal(decode_tile(data, compression, width, height, channels, np.uint8), pixels)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(LOSSLESS), hnp.arrays(np.float32, (5, 7, 1), elements=st.floats(width=32)))
def test_float32_round_trip_property(compression: str, pixels: np.ndarray) -> None:
    decoded = decode_tile(encode_tile(pixels, compression), compression, 7, 5, 1, np.float32)
    assert decoded.tobytes() == pixels.astype("<f4").tobytes()  # bit-exact, NaNs included


def test_normalize_compression() -> None:
    assert normalize_compression("none") == "raw"
    assert normalize_compression("ZIP") == "zip"
    assert set(COMPRESSIONS) == {"raw", "jpg", "jpg90", "png", "zip", "lzw", "pkb"}
    with pytest.raises(CodecError, match="unknown compression"):
        normalize_compression("webp")


def test_rok4_sample_names_are_dtypes() -> None:
    data = encode_tile(np.full((2, 2, 1), 3.5, np.float32), "none")
    assert decode_tile(data, "RAW", 2, 2, 1, "FLOAT32").dtype == np.dtype("<f4")
    assert decode_tile(bytes(4), "raw", 2, 2, 1, "UINT8").dtype == np.uint8
    with pytest.raises(CodecError, match="sample type"):
        decode_tile(bytes(4), "raw", 2, 2, 1, "UINT16")


@pytest.mark.parametrize(
    ("pixels", "compression", "message"),
    [
        (np.zeros((8, 8, 4), np.uint8), "jpg", "4 channels"),
        (np.zeros((8, 8, 1), np.uint8), "jpg90", "1 channels"),
        (np.zeros((8, 8, 1), np.float32), "png", "uint8"),
        (np.zeros((8, 8, 5), np.uint8), "zip", "5 channels"),
        (np.zeros((8, 8, 1), np.int16), "raw", "unsupported sample type"),
        (np.zeros((8, 8), np.uint8), "raw", "shaped"),
    ],
)
def test_unsupported_layouts(pixels: np.ndarray, compression: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode_tile(pixels, compression)


@pytest.mark.parametrize(("compression", "dtype", "channels"), CASES)
def test_corrupt_payloads_raise(compression: str, dtype: type, channels: int) -> None:
    data = encode_tile(sample_tile(16, 16, channels, dtype), compression)
    for bad in (data[: len(data) // 2], b"", b"garbage" * 3):
        with pytest.raises(CodecError):
            decode_tile(bad, compression, 16, 16, channels, dtype)
    with pytest.raises(CodecError):  # right payload, wrong declared size
        decode_tile(data, compression, 16, 17, channels, dtype)


def test_zlib_stream_longer_than_tile_is_rejected() -> None:
    data = zlib.compress(bytes(300), 6)
    with pytest.raises(CodecError, match="longer"):
        decode_tile(data, "zip", 16, 16, 1, np.uint8)
