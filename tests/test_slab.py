"""Slab layout: index parsing, header, byte-identical rebuilds of real ROK4 slabs, TIFF wrapper."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tileserver.rok4.codecs import decode_tile, encode_tile
from tileserver.rok4.slab import (
    HEADER_SIZE,
    SYMLINK_SIGNATURE,
    NotASlabError,
    SlabIndex,
    build_slab,
    build_vector_slab,
    index_size,
    parse_index,
    read_header,
    tiff_wrap,
)

DATA = Path(__file__).parent / "data"
PYRAMIDS = DATA / "pyramids"
ORTHOHR = DATA / "slabs" / "ORTHOHR.tif"
NOTASLAB = DATA / "slabs" / "NOTASLAB.tif"
DTYPES = {"UINT8": np.uint8, "FLOAT32": np.float32}


def pyramid_slabs() -> list[tuple[Path, int, int, str, str, int]]:
    """(slab, tiles_per_width, tiles_per_height, compression, sample format, channels) of every fixture."""
    slabs = []
    for descriptor_path in sorted(PYRAMIDS.glob("*.json")):
        descriptor = json.loads(descriptor_path.read_text())
        _, compression, sample_format = descriptor["format"].split("_")
        channels = descriptor["raster_specifications"]["channels"]
        for level in descriptor["levels"]:
            for slab in sorted((PYRAMIDS / level["storage"]["image_directory"]).rglob("*.tif")):
                grid = (level["tiles_per_width"], level["tiles_per_height"])
                slabs.append((slab, *grid, compression.lower(), sample_format, channels))
    return slabs


def orthohr_slab() -> tuple[Path, int, int, str, str, int]:
    with tifffile.TiffFile(ORTHOHR) as tif:
        page = tif.pages[0]
        grid = (page.imagewidth // page.tilewidth, page.imagelength // page.tilelength)
    return (ORTHOHR, *grid, "jpg", "UINT8", 3)


FIXTURES = [*pyramid_slabs(), orthohr_slab()]
FIXTURE_IDS = [str(f[0].relative_to(DATA)) for f in FIXTURES]


def test_fixtures_cover_every_kind() -> None:
    kinds = {(f[3], f[4], f[5]) for f in FIXTURES}
    assert kinds == {("png", "UINT8", 1), ("png", "UINT8", 4), ("zip", "FLOAT32", 1), ("jpg", "UINT8", 3)}
    assert len(FIXTURES) == len(list(PYRAMIDS.glob("*/DATA/**/*.tif"))) + 1  # every slab belongs to a level


@pytest.mark.parametrize(
    ("path", "tpw", "tph", "compression", "sample_format", "channels"), FIXTURES, ids=FIXTURE_IDS
)
def test_fixture_slab(
    path: Path, tpw: int, tph: int, compression: str, sample_format: str, channels: int
) -> None:
    data = path.read_bytes()
    n_tiles = tpw * tph
    index = parse_index(data[: index_size(n_tiles)], n_tiles, str(path))
    header = read_header(data, str(path))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert index.offsets == tuple(page.dataoffsets)
        assert index.sizes == tuple(page.databytecounts)
        assert (header.width, header.height) == (page.imagewidth, page.imagelength)
        assert (header.tile_width, header.tile_height) == (page.tilewidth, page.tilelength)
        assert header.channels == page.samplesperpixel == channels
        assert header.n_tiles == n_tiles and header.sample_format == sample_format
        whole = (
            None if compression == "png" else page.asarray().reshape(header.height, header.width, channels)
        )
    tw, th = header.tile_width, header.tile_height
    assert index.offsets[-1] + index.sizes[-1] == len(data)  # no trailing padding

    tiles = [data[o : o + s] for o, s in zip(index.offsets, index.sizes, strict=True)]
    for i, tile in enumerate(tiles):
        pixels = decode_tile(tile, compression, tw, th, channels, DTYPES[sample_format])
        assert pixels.shape == (th, tw, channels)
        if compression == "png":
            with Image.open(io.BytesIO(tile)) as image:
                assert image.size == (tw, th) and len(image.getbands()) == channels
                np.testing.assert_array_equal(pixels, np.asarray(image).reshape(th, tw, channels))
        else:
            row, col = divmod(i, tpw)
            expected = whole[row * th : (row + 1) * th, col * tw : (col + 1) * tw]
            if compression == "zip":
                np.testing.assert_array_equal(pixels, expected)
            else:
                assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2
        if compression in ("png", "zip"):  # our encoder is ROK4's, byte for byte
            assert encode_tile(pixels, compression) == tile

    rebuilt = build_slab(tiles, tpw, tph, tw, th, channels, sample_format, compression)
    assert rebuilt == data


def test_montagne_golden_header() -> None:
    """The §1.2 golden bytes of a TIFF_PNG_UINT8 RGBA slab."""
    data = (PYRAMIDS / "MONTAGNE" / "DATA" / "17" / "PI" / "HH" / "I0.tif").read_bytes()
    assert data[:16] == bytes.fromhex("49492a00100000000800080008000800")
    assert data[16:18] == b"\x0c\x00"
    assert not any(data[0xA4:HEADER_SIZE])
    index = parse_index(data, 4)
    assert index == SlabIndex((2080, 3408, 5200, 6992), (1320, 1785, 1779, 4592))


def mosaic(tiles: list[np.ndarray], tpw: int) -> np.ndarray:
    return np.concatenate([np.concatenate(tiles[r : r + tpw], axis=1) for r in range(0, len(tiles), tpw)])


def sample_tiles(n: int, height: int, width: int, channels: int, dtype: type) -> list[np.ndarray]:
    y, x = np.mgrid[0:height, 0:width]
    tiles = []
    for i in range(n):
        planes = [(x + 2 * y + 30 * c + 9 * i) % 256 for c in range(channels)]
        tile = np.stack(planes, axis=-1)
        tile[: height // 3, : width // 3] = i  # runs for PackBits, nodata-like areas
        tiles.append(tile.astype(dtype) * (np.float32(1.25) if dtype == np.float32 else 1))
    return tiles


LAYOUTS = [("UINT8", 1), ("UINT8", 2), ("UINT8", 3), ("UINT8", 4), ("FLOAT32", 1)]
SYNTHETIC = [
    *[(c, sf, ch) for c in ("raw", "zip", "lzw", "pkb") for sf, ch in LAYOUTS],
    *[("png", "UINT8", ch) for ch in (1, 2, 3, 4)],
    ("jpg", "UINT8", 3),
    ("jpg90", "UINT8", 3),
]


@pytest.mark.parametrize(("compression", "sample_format", "channels"), SYNTHETIC)
def test_synthetic_slab_round_trip(compression: str, sample_format: str, channels: int) -> None:
    tpw, tph, tw, th = 3, 2, 24, 16
    dtype = DTYPES[sample_format]
    tiles = sample_tiles(tpw * tph, th, tw, channels, dtype)
    slab = build_slab(
        [encode_tile(t, compression) for t in tiles], tpw, tph, tw, th, channels, sample_format, compression
    )
    index = parse_index(slab[: index_size(6)], 6, "synthetic")
    header = read_header(slab)
    assert (header.tiles_per_width, header.tiles_per_height, header.channels) == (tpw, tph, channels)
    assert index.offsets[0] == index_size(6)
    assert all(o % 16 == 0 for o in index.offsets[1:])
    assert index.offsets[-1] + index.sizes[-1] == len(slab)

    lossy = compression.startswith("jpg")
    for tile, offset, size in zip(tiles, index.offsets, index.sizes, strict=True):
        decoded = decode_tile(slab[offset : offset + size], compression, tw, th, channels, dtype)
        if lossy:
            assert np.abs(decoded.astype(int) - tile.astype(int))[th // 3 :, tw // 3 :].mean() < 3
        else:
            np.testing.assert_array_equal(decoded, tile)

    if compression != "png":  # PNG slabs claim Deflate: no TIFF reader can decode them
        read = tifffile.imread(io.BytesIO(slab)).reshape(th * tph, tw * tpw, channels)
        expected = mosaic(tiles, tpw)
        if lossy:
            assert np.abs(read.astype(int) - expected.astype(int)).mean() < 3
        else:
            np.testing.assert_array_equal(read, expected)


def test_header_tags_per_layout() -> None:
    def tags(channels: int, sample_format: str, compression: str) -> dict[int, object]:
        tile = encode_tile(sample_tiles(1, 16, 16, channels, DTYPES[sample_format])[0], compression)
        slab = build_slab([tile] * 4, 2, 2, 16, 16, channels, sample_format, compression)
        with tifffile.TiffFile(io.BytesIO(slab)) as tif:
            return {tag.code: tag.value for tag in tif.pages[0].tags.values()}

    jpeg = tags(3, "UINT8", "jpg")
    assert jpeg[259] == 7 and jpeg[262] == 6 and jpeg[530] == (2, 2) and 338 not in jpeg
    gray_alpha = tags(2, "UINT8", "zip")
    assert gray_alpha[258] == (8, 8) and gray_alpha[262] == 1 and gray_alpha[338] == (2,)
    float_gray = tags(1, "FLOAT32", "lzw")
    assert float_gray[258] == 32 and float_gray[339] == 3 and float_gray[259] == 5
    assert tags(4, "UINT8", "pkb")[259] == 32773
    assert tags(4, "UINT8", "png")[259] == 8
    assert tags(3, "UINT8", "raw")[262] == 2


def test_two_channel_float32_keeps_rok4_bits_quirk() -> None:
    tile = encode_tile(np.zeros((4, 4, 2), np.float32), "raw")
    slab = build_slab([tile], 1, 1, 4, 4, 2, "FLOAT32", "raw")
    assert read_header(slab).bits_per_sample == (8, 8)
    assert slab[8:16] == struct.pack("<4H", 32, 32, 32, 32)


def test_single_tile_slab() -> None:
    pixels = sample_tiles(1, 16, 16, 3, np.uint8)[0]
    tile = encode_tile(pixels, "zip")
    slab = build_slab([tile], 1, 1, 16, 16, 3, "UINT8", "zip")
    assert struct.unpack_from("<I", slab, 122)[0] == 2056  # TileOffsets inline
    assert struct.unpack_from("<I", slab, 134)[0] == len(tile)  # TileByteCounts inline
    assert struct.unpack_from("<2I", slab, 2048) == (2056, len(tile))
    assert slab[2056:] == tile
    assert parse_index(slab[: index_size(1)], 1) == SlabIndex((2056,), (len(tile),))
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(slab)), pixels)


def test_odd_tile_count_first_tile_unaligned() -> None:
    """With an odd number of tiles the first tile sits at 2048 + 8n, off the 16-byte grid."""
    tiles = [b"a" * 5, b"b" * 20, b"c"]
    slab = build_vector_slab(tiles, 3, 1)
    index = parse_index(slab, 3)
    assert index.offsets == (2072, 2080, 2112)
    assert slab[2077:2080] == bytes(3) and len(slab) == 2113


def test_vector_slab() -> None:
    tiles = [b"\x1a\x02pbf", b"", b"\x1a\x05other", b""]
    slab = build_vector_slab(tiles, 2, 2)
    assert slab[:16] == bytes.fromhex("49492a00100000000000000000000000")
    entries = [struct.unpack_from("<HHII", slab, 18 + 12 * i) for i in range(4)]
    assert struct.unpack_from("<H", slab, 16)[0] == 4
    assert entries == [(256, 4, 1, 1), (257, 4, 1, 1), (324, 4, 4, 2048), (325, 4, 4, 2064)]
    index = parse_index(slab, 4)
    assert index.sizes == (5, 0, 7, 0)
    assert index.offsets == (2080, 2096, 2096, 2112)  # an empty tile does not advance the position
    assert len(slab) == 2103
    assert slab[2096:] == tiles[2]


def test_single_tile_vector_slab_keeps_rok4_quirk() -> None:
    """ROK4 writes a lone tile's size at byte 134 even though the vector IFD ends before it."""
    slab = build_vector_slab([b"tile"], 1, 1)
    assert struct.unpack_from("<HHII", slab, 54) == (325, 4, 1, 2052)
    assert struct.unpack_from("<I", slab, 134)[0] == 4
    assert parse_index(slab, 1) == SlabIndex((2056,), (4,))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_vector_slab_property(tpw: int, tph: int, data: st.DataObject) -> None:
    tiles = data.draw(st.lists(st.binary(max_size=40), min_size=tpw * tph, max_size=tpw * tph))
    slab = build_vector_slab(tiles, tpw, tph)
    index = parse_index(slab[: index_size(tpw * tph)], tpw * tph)
    assert [slab[o : o + s] for o, s in zip(index.offsets, index.sizes, strict=True)] == tiles
    assert all(o % 16 == 0 for o in index.offsets[1:])
    ends = [o + s for o, s in zip(index.offsets, index.sizes, strict=True) if s]
    assert len(slab) == max([index_size(len(tiles)), *ends])


WRAPPED = [(c, sf, ch) for c in ("raw", "lzw", "zip", "pkb") for sf, ch in [*LAYOUTS, ("FLOAT32", 3)]]


@pytest.mark.parametrize(("compression", "sample_format", "channels"), WRAPPED)
def test_tiff_wrap(compression: str, sample_format: str, channels: int) -> None:
    pixels = sample_tiles(1, 16, 24, channels, DTYPES[sample_format])[0]
    tile = encode_tile(pixels, compression)
    wrapped = tiff_wrap(tile, 24, 16, channels, sample_format, compression)
    header_size = {1: 134, 2: 146, 3: 146, 4: 162}[channels]
    assert len(wrapped) == header_size + len(tile) and wrapped.endswith(tile)
    assert wrapped[:8] == b"II*\x00\x08\x00\x00\x00"
    assert struct.unpack_from("<I", wrapped, 18)[0] == 24  # the fields ROK4 patches in its templates
    assert struct.unpack_from("<I", wrapped, 30)[0] == 16
    assert struct.unpack_from("<I", wrapped, 102)[0] == 16
    assert struct.unpack_from("<I", wrapped, 114)[0] == len(tile)
    assert struct.unpack_from("<I", wrapped, 78)[0] == header_size  # StripOffsets
    read = tifffile.imread(io.BytesIO(wrapped))
    np.testing.assert_array_equal(read.reshape(pixels.shape), pixels)


def test_tiff_wrap_refuses_self_contained_formats() -> None:
    with pytest.raises(ValueError, match="served as they are stored"):
        tiff_wrap(b"\xff\xd8", 256, 256, 3, "UINT8", "jpg")


def test_not_a_slab_fixture() -> None:
    data = NOTASLAB.read_bytes()
    with pytest.raises(NotASlabError, match=r"NOTASLAB\.tif is not a ROK4 slab") as caught:
        parse_index(data[: index_size(4)], 4, "pyr/DATA/NOTASLAB.tif")
    assert caught.value.name == "pyr/DATA/NOTASLAB.tif"
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)
    with pytest.raises(NotASlabError, match="not a ROK4 slab"):
        read_header(data, "NOTASLAB.tif")


@pytest.mark.parametrize("cut", [0, 10, 100, 2050])
def test_truncated_slab(cut: int) -> None:
    data = (PYRAMIDS / "RGEALTI" / "DATA" / "0" / "00" / "00" / "1B.tif").read_bytes()[:cut]
    with pytest.raises(NotASlabError, match=r"RGEALTI/1B is not a ROK4 slab: .*(truncated|signature)"):
        parse_index(data, 4, "RGEALTI/1B")


def test_symlink_object_is_not_a_slab() -> None:
    with pytest.raises(NotASlabError, match="not a ROK4 slab"):
        parse_index(SYMLINK_SIGNATURE + b"pyramids/ALTI/DATA_6_1121_11181", 4, "link")


def test_corrupted_index() -> None:
    data = bytearray(
        (PYRAMIDS / "RGEALTI" / "DATA" / "0" / "00" / "00" / "1B.tif").read_bytes()[: index_size(4)]
    )
    parse_index(bytes(data), 4)
    struct.pack_into("<I", data, HEADER_SIZE + 4, 100)  # second tile inside the header
    with pytest.raises(NotASlabError, match="inside the header"):
        parse_index(bytes(data), 4, "x")
    struct.pack_into("<I", data, HEADER_SIZE + 4, 2060)  # inside the index
    with pytest.raises(NotASlabError, match="inside the header or index"):
        parse_index(bytes(data), 4, "x")


def test_wrong_tile_count() -> None:
    data = (PYRAMIDS / "RGEALTI" / "DATA" / "0" / "00" / "00" / "1B.tif").read_bytes()
    with pytest.raises(NotASlabError, match="declares 4 tiles, expected 256"):
        parse_index(data, 256, "x")


def test_build_slab_rejects_bad_input() -> None:
    tile = encode_tile(np.zeros((4, 4, 1), np.uint8), "raw")
    with pytest.raises(ValueError, match="3 tiles for a 2x2 slab"):
        build_slab([tile] * 3, 2, 2, 4, 4, 1, "UINT8", "raw")
    with pytest.raises(ValueError, match="empty"):
        build_slab([tile, b""], 2, 1, 4, 4, 1, "UINT8", "raw")
    with pytest.raises(ValueError, match="3-channel UINT8"):
        build_slab([tile], 1, 1, 4, 4, 1, "UINT8", "jpg")
    with pytest.raises(ValueError, match="UINT8 data only"):
        build_slab([tile], 1, 1, 4, 4, 1, "FLOAT32", "png")
    with pytest.raises(ValueError, match="sample format"):
        build_slab([tile], 1, 1, 4, 4, 1, "UINT16", "raw")
