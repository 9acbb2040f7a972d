"""`pyramid build`: round trips on the real sources, ROK4 layout, masks, upper levels, resume."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_writer_util import FIXTURES, SETTINGS, SOURCES, Reference, data_mask, level_tiles, psnr

from tileserver.pyramid import Pyramid
from tileserver.rok4.descriptor import parse_descriptor
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.rok4.slab import read_header
from tileserver.storage import Storage
from tileserver.writer import engine
from tileserver.writer.build import build_async
from tileserver.writer.errors import WriterError
from tileserver.writer.options import BuildOptions

UINT8_COMPRESSIONS = ["raw", "jpg", "jpg90", "png", "zip", "lzw", "pkb"]
LOSSLESS = {"raw", "png", "zip", "lzw", "pkb"}


async def build(tmp_path: Path, sources: list[str], name: str = "P", **options) -> tuple[Pyramid, dict, Storage]:
    storage = Storage(SETTINGS)
    await storage.start()
    options.setdefault("width", 2)
    options.setdefault("height", 2)
    summary = await build_async([str(SOURCES / s) for s in sources], str(tmp_path), name,
                                BuildOptions(**options), storage)
    return await Pyramid.open(str(tmp_path / f"{name}.json"), storage), summary, storage


def compare_nearest(pyramid: Pyramid, level: str, tiles: dict, ref: Reference) -> tuple[int, int]:
    """(mismatching pixels, compared pixels) against the reference, where both have data."""
    bad = total = 0
    for (col, row), tile in tiles.items():
        expected, inside = ref.nearest(pyramid.matrix(level), pyramid.tms.crs, col, row)
        mask = data_mask(tile, pyramid.descriptor.nodata)
        both = mask & inside
        bad += int(np.any(tile[both] != expected[both], axis=-1).sum())
        total += int(both.sum())
        # no data invented outside the source, none lost inside (nn: same pixel centres)
        assert not (mask & ~inside).any()
    return bad, total


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", UINT8_COMPRESSIONS)
async def test_scan1000_native_grid_every_compression(tmp_path, compression):
    """LAMB93_12.5m level 10 is the source's own 100 m lattice: nn + lossless must be exact."""
    pyramid, summary, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="LAMB93_12.5m",
                                            bottom="10", top="10", compression=compression, interpolation="nn")
    try:
        tiles = await level_tiles(pyramid, "10")
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        assert tiles
        if compression in LOSSLESS:
            bad, total = compare_nearest(pyramid, "10", tiles, ref)
            assert total == 200 * 200 and bad == 0
        else:  # a scanned map (sharp text) through JPEG: PSNR over the whole level
            pairs = [(tile[inside], expected[inside]) for (col, row), tile in tiles.items()
                     for expected, inside in [ref.nearest(pyramid.matrix("10"), pyramid.tms.crs, col, row)]]
            quality = psnr(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
            assert quality > (24 if compression == "jpg" else 26)  # 4:2:0 chroma dominates
        assert summary["type_infos"]["compression"] == compression.upper()
        assert pyramid.descriptor.format.code == f"TIFF_{compression.upper()}_UINT8"
    finally:
        await storage.close()


@pytest.mark.parametrize(("tms", "level", "compression"), [
    ("PM", "11", "png"), ("PM", "11", "jpg"), ("PM", "11", "zip"),
    ("4326", "10", "png"), ("4326", "10", "lzw"), ("4326", "10", "jpg90"),
    ("LAMB93", "9", "pkb"), ("LAMB93", "9", "raw"),
])
async def test_scan1000_reprojected_nearest(tmp_path, tms, level, compression):
    """Reprojected nn: the same source pixel as pyproj point by point, but for the few pixel
    centres that fall within the warp's interpolation error of a source pixel edge."""
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms=tms, bottom=level,
                                      top=level, compression=compression, interpolation="nn")
    try:
        tiles = await level_tiles(pyramid, level)
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        if compression in LOSSLESS:
            bad, total = compare_nearest(pyramid, level, tiles, ref)
            assert total > 5000 and bad <= total * 0.002
        else:
            pairs = [(tile[inside], expected[inside]) for (col, row), tile in tiles.items()
                     for expected, inside in [ref.nearest(pyramid.matrix(level), pyramid.tms.crs, col, row)]]
            assert psnr(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])) > 24
    finally:
        await storage.close()


@pytest.mark.parametrize(("tms", "level"), [("PM", "11"), ("LAMB93", "10"), ("4326", "10")])
async def test_scan1000_linear_matches_independent_bilinear(tmp_path, tms, level):
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms=tms, bottom=level,
                                      top=level, compression="zip", interpolation="linear")
    try:
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        for (col, row), tile in (await level_tiles(pyramid, level)).items():
            expected, inside = ref.bilinear(pyramid.matrix(level), pyramid.tms.crs, col, row)
            mask = data_mask(tile, pyramid.descriptor.nodata)
            both = mask & inside
            assert np.abs(tile[both] - expected[both]).max(initial=0) <= 1.0  # uint8 rounding
    finally:
        await storage.close()


@pytest.mark.parametrize("compression", ["raw", "zip", "lzw", "pkb"])
async def test_float32_dem_native_grid_exact(tmp_path, compression):
    pyramid, summary, storage = await build(tmp_path, ["RGEALTI.tif"], srs="EPSG:2154", tms="LAMB93_1M_MNT",
                                            bottom="8", top="8", compression=compression, interpolation="nn")
    try:
        ref = Reference("RGEALTI.tif", "EPSG:2154")
        compared = 0
        for (col, row), tile in (await level_tiles(pyramid, "8")).items():
            assert tile.dtype == np.float32
            expected, inside = ref.nearest(pyramid.matrix("8"), pyramid.tms.crs, col, row)
            assert np.abs(tile[inside] - expected[inside]).max(initial=0) <= 1e-3
            assert np.all(tile[~inside] == -99999)
            compared += int(inside.sum())
        assert compared == 200 * 200
        assert summary["type_infos"]["channels_format"] == "FLOAT32"
        assert summary["type_infos"]["nodata_value"] == "-99999"
    finally:
        await storage.close()


@pytest.mark.parametrize(("source", "crs", "tms", "level"), [
    ("RGEALTI.tif", "EPSG:2154", "PM", "17"),
    ("mnt.tif", "EPSG:2154", "LAMB93_1M_MNT", "5"),
    ("D972.tif", "IGNF:UTM20W84MART", "4326", "10"),
])
async def test_float32_dem_reprojected_bilinear(tmp_path, source, crs, tms, level):
    pyramid, _, storage = await build(tmp_path, [source], srs=crs, tms=tms, bottom=level, top=level,
                                      compression="zip", interpolation="linear")
    try:
        ref = Reference(source, crs)
        compared = 0
        for (col, row), tile in (await level_tiles(pyramid, level)).items():
            expected, inside = ref.bilinear(pyramid.matrix(level), pyramid.tms.crs, col, row)
            both = data_mask(tile, pyramid.descriptor.nodata) & inside
            # the warp interpolates source coordinates (≤ 1/8 pixel): a few centimetres of height
            assert np.abs(tile[both] - expected[both]).max(initial=0) <= 0.05 * max(np.ptp(ref.pixels), 1) / 10
            compared += int(both.sum())
        assert compared > 1000
    finally:
        await storage.close()


async def test_ignf_source_in_its_native_grid_exact(tmp_path):
    """D972 (IGNF:UTM20W84MART, 250 m) lies on UTM20W84MART_1M_MNT level 2's lattice."""
    pyramid, summary, storage = await build(tmp_path, ["D972.tif"], srs="IGNF:UTM20W84MART",
                                            tms="UTM20W84MART_1M_MNT", bottom="2", top="2", compression="pkb",
                                            interpolation="nn")
    try:
        ref = Reference("D972.tif", "IGNF:UTM20W84MART")
        bad, total = compare_nearest(pyramid, "2", await level_tiles(pyramid, "2"), ref)
        assert bad == 0 and total == ref.pixels.shape[0] * ref.pixels.shape[1]
        assert summary["srs"] == "IGNF:UTM20W84MART"
    finally:
        await storage.close()


async def test_bilevel_source_and_world_file(tmp_path):
    """BDPARCELLAIRE: 1-bit TIFF georeferenced by a .tfw only, into 4326 like the ROK4 fixture."""
    pyramid, _, storage = await build(tmp_path, ["BDPARCELLAIRE.tif"], srs="EPSG:2154", tms="4326", bottom="19",
                                      top="16", compression="png", interpolation="nn", nodata=(255,))
    try:
        tiles = await level_tiles(pyramid, "19")
        ref = Reference("BDPARCELLAIRE.tif", "EPSG:2154")
        bad = total = 0
        for (col, row), tile in tiles.items():
            expected, inside = ref.nearest(pyramid.matrix("19"), pyramid.tms.crs, col, row)
            bad += int(np.count_nonzero(tile[inside] != expected[inside]))
            total += int(inside.sum())
        assert total > 0.9 * 1000 * 1000 * (0.1 / (pyramid.matrix("19").cell_size * 80000)) ** 2 / 2
        assert bad <= total * 0.002
        fixture = parse_descriptor((FIXTURES / "BDPARCELLAIRE.json").read_bytes())
        for level in ("16", "17", "18", "19"):  # 19: be4's footprint, 2 % wider east and west
            assert pyramid.level(level).tile_limits == fixture.level(level).tile_limits
    finally:
        await storage.close()


# --- layout against the ROK4 fixtures -------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "source", "crs", "options"), [
    ("SCAN1000", "SCAN1000.tif", "EPSG:2154", {"tms": "PM", "top": "0", "compression": "png"}),
    ("BDPARCELLAIRE", "BDPARCELLAIRE.tif", "EPSG:2154", {"tms": "4326", "top": "0", "compression": "png",
                                                         "interpolation": "nn", "nodata": (255,)}),
    ("RGEALTI", "RGEALTI.tif", "EPSG:2154", {"tms": "LAMB93_1M_MNT", "top": "0", "compression": "zip",
                                             "interpolation": "nn"}),
    # MONTAGNE is RGEALTI drawn with the `montagne` style (RGBA): its layout is RGEALTI's in PM
    ("MONTAGNE", "RGEALTI.tif", "EPSG:2154", {"tms": "PM", "top": "0", "compression": "zip", "interpolation": "nn"}),
])
async def test_descriptor_and_list_shaped_like_rok4(tmp_path, fixture, source, crs, options):
    """Default bottom (nearest the source resolution), limits of every level, slab names and the
    whole list as be4's for the same source, up to the fixture's top level."""
    pyramid, _, storage = await build(tmp_path, [source], srs=crs, **options)
    try:
        ours = json.loads((tmp_path / "P.json").read_text())
        theirs = json.loads((FIXTURES / f"{fixture}.json").read_text())
        assert ours.keys() == theirs.keys()
        assert ours["raster_specifications"].keys() == theirs["raster_specifications"].keys()
        assert isinstance(ours["raster_specifications"]["nodata"], str)
        by_id = {lv["id"]: lv for lv in theirs["levels"]}
        ids = [lv["id"] for lv in ours["levels"]]
        assert ids == sorted(ids, key=lambda i: pyramid.matrix(i).cell_size, reverse=True)  # top → bottom
        assert pyramid.bottom_level.id == min(by_id, key=lambda i: pyramid.matrix(i).cell_size)
        for level in ours["levels"]:
            assert level.keys() == by_id[level["id"]].keys()
            assert level["tile_limits"] == by_id[level["id"]]["tile_limits"]
            assert level["storage"] == {**by_id[level["id"]]["storage"],
                                        "image_directory": f"P/DATA/{level['id']}"}
        our_list = parse_list((tmp_path / "P.list").read_text())
        their_list = parse_list((FIXTURES / f"{fixture}.list").read_text())
        assert our_list.roots == {0: str(tmp_path / "P")}
        assert sorted(ids) == sorted(by_id)
        assert sorted(s for _, s, _ in our_list.entries) == sorted(s for _, s, _ in their_list.entries)
        for _, slab, _ in our_list.entries:
            assert (tmp_path / "P" / slab).is_file()
    finally:
        await storage.close()


async def test_limits_claim_the_tile_past_an_edge_like_be4(tmp_path):
    """A source ending exactly on a tile edge: be4 (`bboxToIndices`) puts that edge in the tile
    after it, so the limits reach one tile further east and south (inside the one written slab)."""
    tifffile.imwrite(tmp_path / "a.tif", np.full((256, 256, 3), 7, np.uint8))
    # LAMB93_12.5m level 10: origin (0, 12000000), 100 m pixels; the image is exactly tile (24, 212)
    (tmp_path / "a.tfw").write_text("100\n0\n0\n-100\n614450\n6572750\n")
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(tmp_path / "a.tif")], str(tmp_path / "out"), "E",
                          BuildOptions(tms="LAMB93_12.5m", bottom="10", top="10", interpolation="nn", srs="EPSG:2154",
                                       width=2, height=2, compression="zip"), storage)
        pyramid = await Pyramid.open(str(tmp_path / "out" / "E.json"), storage)
        tiles = await level_tiles(pyramid, "10")
        assert {key for key, tile in tiles.items() if data_mask(tile, pyramid.descriptor.nodata).any()} == {(24, 212)}
        limits = pyramid.level("10").tile_limits
        assert (limits.min_col, limits.max_col, limits.min_row, limits.max_row) == (24, 25, 212, 213)
        entries = [s for _, s, _ in parse_list((tmp_path / "out" / "E.list").read_text()).entries]
        assert [(parse_slab_name(s).col, parse_slab_name(s).row) for s in entries] == [(12, 106)]
    finally:
        await storage.close()


@pytest.mark.parametrize("compression", ["raw", "jpg", "zip", "lzw", "pkb"])
async def test_non_png_slabs_are_tiffs_for_tifffile(tmp_path, compression):
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="11",
                                      compression=compression, interpolation="nn")
    try:
        slab_list = parse_list((tmp_path / "P.list").read_text())
        for _, slab, _ in slab_list.entries:
            name = parse_slab_name(slab)
            path = tmp_path / "P" / slab
            header = read_header(path.read_bytes()[:2048])
            assert (header.tiles_per_width, header.tiles_per_height) == (2, 2)
            whole = tifffile.imread(path)
            assert whole.shape == (512, 512, 3)
            for j in range(2):
                for i in range(2):
                    tile = await pyramid.get_tile_array("11", 2 * name.col + i, 2 * name.row + j)
                    part = whole[j * 256 : (j + 1) * 256, i * 256 : (i + 1) * 256]
                    if tile is None:  # outside the limits: encoded all the same, as nodata
                        assert np.all(part >= (250 if compression == "jpg" else 255))
                    elif compression == "jpg":  # tifffile decodes the JFIF tiles with its own libjpeg
                        assert psnr(part, tile) > 35
                    else:
                        assert np.array_equal(part, tile)
    finally:
        await storage.close()


async def test_png_tiles_have_rok4_layout(tmp_path):
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="10", top="10",
                                      compression="png")
    try:
        lim = pyramid.level("10").tile_limits
        data = await pyramid.get_tile("10", lim.min_col, lim.min_row)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[37:41] == b"IDAT" and data[-12:-8] == b"\0\0\0\0"
        raw = zlib.decompress(data[41:-16])
        assert raw[:: 256 * 3 + 1] == b"\0" * 256  # filter 0 on every row
    finally:
        await storage.close()


# --- masks, upper levels, mosaics -----------------------------------------------------------------


async def test_masks_written_and_listed(tmp_path):
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="10",
                                      compression="jpg", mask=True)
    try:
        desc = json.loads((tmp_path / "P.json").read_text())
        assert desc["mask_format"] == "TIFF_ZIP_UINT8"
        assert all(lv["storage"]["mask_directory"] == f"P/MASK/{lv['id']}" for lv in desc["levels"])
        entries = [s for _, s, _ in parse_list((tmp_path / "P.list").read_text()).entries]
        data = [s for s in entries if s.startswith("DATA/")]
        masks = [s for s in entries if s.startswith("MASK/")]
        assert len(data) == len(masks) > 0
        for slab in masks:
            path = tmp_path / "P" / slab
            header = read_header(path.read_bytes()[:2048])
            assert (header.channels, header.compression) == (1, 8)
            mask = tifffile.imread(path)
            assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    finally:
        await storage.close()


async def test_quadtree_upper_level_is_truncated_masked_mean(tmp_path):
    pyramid, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="12", top="11",
                                      compression="zip", mask=True)
    try:
        parents = await level_tiles(pyramid, "11")
        children = await level_tiles(pyramid, "12")
        mosaic_mask = {}
        for (col, row) in children:
            raw = (tmp_path / "P" / pyramid.level("12").storage.slab_name(col // 2, row // 2, mask=True)
                   .removeprefix("P/"))
            mosaic_mask[(col // 2, row // 2)] = tifffile.imread(raw) > 0
        for (col, row), parent in parents.items():
            for j in range(2):
                for i in range(2):
                    child = children.get((2 * col + i, 2 * row + j))
                    block = parent[j * 128 : (j + 1) * 128, i * 128 : (i + 1) * 128].astype(np.int64)
                    if child is None:
                        assert np.all(block == 255)
                        continue
                    cc, cr = 2 * col + i, 2 * row + j
                    slab_mask = mosaic_mask[(cc // 2, cr // 2)]
                    m = slab_mask[(cr % 2) * 256 : (cr % 2 + 1) * 256, (cc % 2) * 256 : (cc % 2 + 1) * 256]
                    m4 = m.reshape(128, 2, 128, 2)
                    d4 = child.astype(np.int64).reshape(128, 2, 128, 2, 3) * m4[..., None]
                    count = m4.sum(axis=(1, 3))
                    expected = np.where(count[..., None] > 0, d4.sum(axis=(1, 3)) // np.maximum(count, 1)[..., None], 255)
                    assert np.array_equal(block, expected)
    finally:
        await storage.close()


async def test_non_quadtree_upper_level_nearest_and_average(tmp_path):
    """LAMB93 levels are not in a 2:1 ratio: nearest decimation by default, `average` on request."""
    results = {}
    for upper_filter in ("auto", "average"):
        out = tmp_path / upper_filter
        pyramid, _, storage = await build(out, ["SCAN1000.tif"], srs="EPSG:2154", tms="LAMB93", bottom="10",
                                          top="9", compression="zip", interpolation="nn", upper_filter=upper_filter)
        try:
            results[upper_filter] = (await level_tiles(pyramid, "9"), pyramid)
        finally:
            await storage.close()
    tiles, pyramid = results["auto"]
    children = await _reopen_tiles(pyramid, "10")
    parent, child = pyramid.matrix("9"), pyramid.matrix("10")
    checked = 0
    for (col, row), tile in tiles.items():
        xmin, _, _, ymax = parent.tile_bbox(col, row)
        for j in range(0, 256, 7):
            for i in range(0, 256, 7):
                x, y = xmin + (i + 0.5) * parent.cell_size, ymax - (j + 0.5) * parent.cell_size
                ccol, crow, ci, cj = child.point_to_pixel(x, y)
                source = children.get((ccol, crow))
                expected = source[cj, ci] if source is not None else np.full(3, 255)
                assert np.array_equal(tile[j, i], expected)  # decimateNtiff: the child pixel under the centre
                checked += 1
    assert checked > 1000
    averaged = results["average"][0]
    for key, tile in tiles.items():
        smooth = averaged[key]
        mask = data_mask(tile, pyramid.descriptor.nodata) & data_mask(smooth, pyramid.descriptor.nodata)
        # an area mean is smoother than a decimation: less energy in pixel-to-pixel differences
        assert np.abs(np.diff(smooth.astype(int), axis=1))[mask[:, 1:]].mean() < \
            np.abs(np.diff(tile.astype(int), axis=1))[mask[:, 1:]].mean()


async def _reopen_tiles(pyramid: Pyramid, level: str) -> dict:
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        return await level_tiles(await Pyramid.open(pyramid.url, storage), level)
    finally:
        await storage.close()


async def test_mosaic_later_sources_on_top(tmp_path):
    """Two overlapping images: where both have data the second wins."""
    base = tifffile.imread(SOURCES / "SCAN1000.tif")
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    tifffile.imwrite(a, base[:120])
    tifffile.imwrite(b, np.full((100, 100, 3), 7, np.uint8))
    (tmp_path / "a.tfw").write_text("100\n0\n0\n-100\n600050\n6579950\n")
    (tmp_path / "b.tfw").write_text("100\n0\n0\n-100\n605050\n6574950\n")  # offset by 50 px right and down
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(a), str(b)], str(tmp_path / "out"), "M",
                          BuildOptions(tms="LAMB93_12.5m", bottom="10", top="10", interpolation="nn", srs="EPSG:2154",
                                       width=2, height=2, compression="zip"), storage)
        pyramid = await Pyramid.open(str(tmp_path / "out" / "M.json"), storage)
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        matrix = pyramid.matrix("10")
        for (col, row), tile in (await level_tiles(pyramid, "10")).items():
            expected, inside = ref.nearest(matrix, pyramid.tms.crs, col, row)
            xs = matrix.tile_bbox(col, row)[0] + (np.arange(256) + 0.5) * 100
            ys = matrix.tile_bbox(col, row)[3] - (np.arange(256) + 0.5) * 100
            gx, gy = np.meshgrid(xs, ys)
            in_b = (gx > 605000) & (gx < 615000) & (gy < 6575000) & (gy > 6565000)
            in_a = (gx > 600000) & (gx < 620000) & (gy < 6580000) & (gy > 6568000)
            assert np.all(tile[in_b] == 7)
            assert np.array_equal(tile[in_a & ~in_b], expected[in_a & ~in_b])
            assert np.all(tile[~in_a & ~in_b] == 255)
    finally:
        await storage.close()


async def test_channels_conversion_and_nodata_option(tmp_path):
    pyramid, summary, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="LAMB93_12.5m",
                                            bottom="10", top="10", compression="png", interpolation="nn",
                                            samplesperpixel=4, nodata=(0, 0, 0, 0))
    try:
        assert summary["type_infos"]["channels_number"] == 4
        assert summary["type_infos"]["nodata_value"] == "0,0,0,0"
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        for (col, row), tile in (await level_tiles(pyramid, "10")).items():
            expected, inside = ref.nearest(pyramid.matrix("10"), pyramid.tms.crs, col, row)
            assert np.array_equal(tile[inside][:, :3], expected[inside])
            assert np.all(tile[inside][:, 3] == 255) and np.all(tile[~inside] == 0)
    finally:
        await storage.close()


async def test_jpeg_with_world_file_source(tmp_path):
    from PIL import Image

    base = tifffile.imread(SOURCES / "SCAN1000.tif")
    Image.fromarray(base).save(tmp_path / "scan.png")
    (tmp_path / "scan.pgw").write_text((SOURCES / "SCAN1000.tfw").read_text())
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(tmp_path / "scan.png")], str(tmp_path / "out"), "J",
                          BuildOptions(tms="LAMB93_12.5m", bottom="10", top="10", interpolation="nn", srs="EPSG:2154",
                                       width=2, height=2, compression="lzw"), storage)
        pyramid = await Pyramid.open(str(tmp_path / "out" / "J.json"), storage)
        bad, total = compare_nearest(pyramid, "10", await level_tiles(pyramid, "10"),
                                     Reference("SCAN1000.tif", "EPSG:2154"))
        assert bad == 0 and total == 40000
    finally:
        await storage.close()


# --- parallel, resume -----------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".list" and p.name != "summary.json"}


async def test_processes_give_the_same_bytes(tmp_path):
    outputs = {}
    for n in (1, 2):
        _, _, storage = await build(tmp_path / str(n), ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="12",
                                    top="10", compression="png", parallelization=n)
        await storage.close()
        outputs[n] = _tree(tmp_path / str(n))
    assert outputs[1] == outputs[2] and len(outputs[1]) > 5


def count_stores(monkeypatch, fail_after: int | None = None) -> list[tuple[str, int, int]]:
    """Record every slab the engine stores; raise once `fail_after` slabs are stored."""
    stored: list[tuple[str, int, int]] = []
    real_store = engine.PyramidWriter.store

    async def store(self, matrix, col, row, result, with_work):
        if fail_after is not None and len(stored) >= fail_after:
            raise WriterError("simulated crash")
        stored.append((matrix.id, col, row))
        return await real_store(self, matrix, col, row, result, with_work)

    monkeypatch.setattr(engine.PyramidWriter, "store", store)
    return stored


async def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    options = {"srs": "EPSG:2154", "tms": "PM", "bottom": "12", "top": "10", "compression": "zip",
               "width": 1, "height": 1}
    with monkeypatch.context() as patch:
        clean = count_stores(patch)
        _, _, storage = await build(tmp_path / "ref", ["SCAN1000.tif"], **options)
        await storage.close()
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        first = count_stores(patch, fail_after=5)
        with pytest.raises(WriterError, match="simulated crash"):
            await build(out, ["SCAN1000.tif"], **options)
    assert len(first) == 5
    assert not (out / "P.json").exists()  # no valid-looking descriptor after a failure
    assert (out / "P.list.partial").exists()
    with monkeypatch.context() as patch:
        second = count_stores(patch)
        _, _, storage = await build(out, ["SCAN1000.tif"], **options)
        await storage.close()
    assert not set(first) & set(second)  # journaled slabs are not computed again
    assert sorted(first + second) == sorted(clean)
    assert _tree(out) == _tree(tmp_path / "ref")
    assert not (out / "P.list.partial").exists() and not (out / "P.work").exists()


async def test_resume_with_other_parameters_is_refused(tmp_path, monkeypatch):
    async def crash(self, *args):
        raise WriterError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(engine.PyramidWriter, "store", crash)
        with pytest.raises(WriterError):
            await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="11")
    with pytest.raises(WriterError, match="other parameters"):
        await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="11", compression="zip")


async def test_existing_pyramid_needs_overwrite(tmp_path):
    _, _, storage = await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="11")
    await storage.close()
    with pytest.raises(WriterError, match="already exists"):
        await build(tmp_path, ["SCAN1000.tif"], srs="EPSG:2154", tms="PM", bottom="11", top="11")
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(SOURCES / "RGEALTI.tif")], str(tmp_path), "P",
                          BuildOptions(tms="PM", bottom="17", top="17", srs="EPSG:2154", width=2, height=2),
                          storage, overwrite=True)
    finally:
        await storage.close()
    entries = parse_list((tmp_path / "P.list").read_text()).entries
    assert all(parse_slab_name(s).level == "17" for _, s, _ in entries)
    assert not (tmp_path / "P" / "DATA" / "11").exists() or not any((tmp_path / "P" / "DATA" / "11").rglob("*.tif"))


async def test_mosaic_of_sources_in_different_crs(tmp_path):
    """SCAN1000 (Lambert-93) under a uniform PNG georeferenced in EPSG:4326 (world file)."""
    from PIL import Image

    lon0, lat1, step = 1.80, 46.30, 0.001  # 100 x 100 pixels of 0.001 degree
    Image.fromarray(np.full((100, 100, 3), 7, np.uint8)).save(tmp_path / "geo.png")
    (tmp_path / "geo.pgw").write_text(f"{step}\n0\n0\n{-step}\n{lon0 + step / 2}\n{lat1 - step / 2}\n")
    import shutil

    for ext in ("tif", "tfw"):
        shutil.copy(SOURCES / f"SCAN1000.{ext}", tmp_path / f"scan.{ext}")
    (tmp_path / "scan.prj").write_text(__import__("pyproj").CRS("EPSG:2154").to_wkt("WKT1_GDAL"))
    (tmp_path / "geo.prj").write_text(__import__("pyproj").CRS("EPSG:4326").to_wkt("WKT1_GDAL"))
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(tmp_path / "scan.tif"), str(tmp_path / "geo.png")], str(tmp_path / "out"), "X",
                          BuildOptions(tms="PM", bottom="12", top="12", interpolation="nn", width=2, height=2,
                                       compression="zip"), storage)
        pyramid = await Pyramid.open(str(tmp_path / "out" / "X.json"), storage)
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        import pyproj

        to_geo = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
        seen = kept = bad = 0
        for (col, row), tile in (await level_tiles(pyramid, "12")).items():
            xmin, _, _, ymax = pyramid.matrix("12").tile_bbox(col, row)
            cell = pyramid.matrix("12").cell_size
            gx, gy = np.meshgrid(xmin + (np.arange(256) + 0.5) * cell, ymax - (np.arange(256) + 0.5) * cell)
            lon, lat = to_geo.transform(gx, gy)
            margin = step / 2
            in_geo = (lon > lon0 + margin) & (lon < lon0 + 0.1 - margin) & (lat < lat1 - margin) & (lat > lat1 - 0.1 + margin)
            out_geo = (lon < lon0 - margin) | (lon > lon0 + 0.1 + margin) | (lat > lat1 + margin) | (lat < lat1 - 0.1 - margin)
            expected, inside = ref.nearest(pyramid.matrix("12"), "EPSG:3857", col, row)
            assert np.all(tile[in_geo] == 7)
            keep = out_geo & inside
            bad += int(np.any(tile[keep] != expected[keep], axis=-1).sum())
            kept += int(keep.sum())
            seen += int(in_geo.sum())
        assert seen > 1000 and kept > 1000 and bad <= kept * 0.002
    finally:
        await storage.close()
