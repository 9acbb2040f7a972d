"""Vector pyramids ("Calcul de pyramide vecteur"): a GeoPackage written with pyogrio → tippecanoe →
ROK4 `TIFF_PBF_MVT` slabs, read back with tileserver's own pyramid reader and decoded with
mapbox-vector-tile. Expected positions are computed here from the source coordinates (pyproj and the
Web Mercator tile formula), never taken from the builder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mapbox_vector_tile
import numpy as np
import pyogrio.raw
import pytest
import shapely
from pyproj import Transformer

from tileserver.pyramid import Pyramid
from tileserver.rok4.mvt import count_features
from tileserver.settings import load_settings
from tileserver.storage import Storage
from tileserver.writer.errors import WriterError
from tileserver.writer.vector_pyramid import (
    Composition,
    VectorPyramidOptions,
    build_vector_pyramid,
    tippecanoe_options,
)

PRESETS = ("-S10", "-pn -S15", "-an -S15", "-aL -D8 -S15", "-ac -aD -an -S15", "-ac -an -S10", "-ab -S20")


def make_base(path: Path) -> dict[str, list[dict[str, Any]]]:
    """`parcelles`: 30 polygons in Lambert 93; `arbres`: 40 points in Lambert 93. Returns the rows
    (lon/lat geometry) as written."""
    rng = np.random.default_rng(3)
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    polygons, rows = [], {"parcelles": [], "arbres": []}
    for i in range(30):
        x, y = to_l93.transform(2.20 + (i % 6) * 0.05, 48.80 + (i // 6) * 0.03)
        polygons.append(shapely.box(x, y, x + 900.0, y + 700.0))
        rows["parcelles"].append({"code": f"P{i:02d}", "surface": 0.5 + i, "usage": "bois" if i % 3 else "pre"})
    pyogrio.raw.write(path, np.array(shapely.to_wkb(polygons), dtype=object),
                      [np.array([r["code"] for r in rows["parcelles"]], dtype=object),
                       np.array([r["surface"] for r in rows["parcelles"]]),
                       np.array([r["usage"] for r in rows["parcelles"]], dtype=object)],
                      ["code", "surface", "usage"], layer="parcelles", driver="GPKG", geometry_type="Polygon",
                      crs="EPSG:2154")
    lons, lats = 2.2 + rng.random(40) * 0.3, 48.8 + rng.random(40) * 0.15
    xs, ys = to_l93.transform(lons, lats)
    points = [shapely.Point(x, y) for x, y in zip(xs, ys, strict=True)]
    for i in range(40):
        rows["arbres"].append({"nom": f"arbre {i}", "hauteur": int(5 + i % 20), "lon": lons[i], "lat": lats[i]})
    pyogrio.raw.write(path, np.array(shapely.to_wkb(points), dtype=object),
                      [np.array([r["nom"] for r in rows["arbres"]], dtype=object),
                       np.array([r["hauteur"] for r in rows["arbres"]], dtype=np.int64)],
                      ["nom", "hauteur"], layer="arbres", driver="GPKG", geometry_type="Point", crs="EPSG:2154",
                      append=True)
    return rows


def tile_of(lon: float, lat: float, zoom: int, extent: int) -> tuple[int, int, float, float]:
    """(col, row, x, y in tile units, y down) of a point in the Web Mercator quadtree."""
    n = 2 ** zoom
    x = (lon + 180.0) / 360.0 * n
    y = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n
    col, row = int(x), int(y)
    return col, row, (x - col) * extent, (y - row) * extent


def read_pyramid(descriptor: str) -> tuple[dict[str, Any], dict[str, dict[tuple[int, int], dict[str, Any]]]]:
    """The descriptor (as JSON) and every tile inside every level's limits, decoded; read with
    tileserver's reader (slab index, ranged reads)."""
    settings = load_settings(env={})

    async def main() -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
        out: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
        async with Storage(settings) as storage:
            pyramid = await Pyramid.open(descriptor, storage, tms_directory=settings.tms_directory)
            for level in pyramid.descriptor.levels:
                lim = level.tile_limits
                tiles = out.setdefault(level.id, {})
                for col in range(lim.min_col, lim.max_col + 1):
                    for row in range(lim.min_row, lim.max_row + 1):
                        data = await pyramid.get_tile(level.id, col, row)
                        if data:
                            tiles[(col, row)] = mapbox_vector_tile.decode(data, default_options={"y_coord_down": True})
                            assert count_features(data) == sum(len(v["features"]) for v in tiles[(col, row)].values())
        return out

    return json.loads(Path(descriptor).read_text()), asyncio.run(main())


def layer_features(tiles: dict[tuple[int, int], dict[str, Any]], layer: str) -> list[dict[str, Any]]:
    """Features of a layer in every tile; points only in the tile they fall in (tiles repeat those
    in their buffer)."""
    out = []
    for tile in tiles.values():
        found = tile.get(layer, {})
        for f in found.get("features", []):
            if f["geometry"]["type"] == "Point":
                x, y = f["geometry"]["coordinates"]
                if not (0 <= x < found["extent"] and 0 <= y < found["extent"]):
                    continue
            out.append(f)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    path = tmp_path_factory.mktemp("base") / "base.gpkg"
    return path, make_base(path)


def build(base_path: Path, out: Path, *items: Composition, name: str = "V", update: str | None = None,
          **options: Any) -> str:
    build_vector_pyramid(base_path, str(out), name, VectorPyramidOptions(tuple(items), **options),
                         settings=load_settings(env={}), update=update)
    return str(out / f"{name}.json")


def test_two_tables_at_different_levels_filter_and_attributes(base: Any, tmp_path: Path) -> None:
    path, rows = base
    descriptor = build(path, tmp_path, Composition("arbres", "6", "12", layer="trees", attributes=("nom",)),
                       Composition("parcelles", "9", "13", filter="surface > 10.0 AND usage = 'bois'"),
                       width=4, height=4)
    doc, levels = read_pyramid(descriptor)
    assert doc["format"] == "TIFF_PBF_MVT"
    assert sorted(levels, key=int) == [str(z) for z in range(6, 14)]
    for level in doc["levels"]:
        z = int(level["id"])
        assert (level["tiles_per_width"], level["tiles_per_height"]) == (4, 4)
        names = {t["name"] for t in level["tables"]}
        assert names == ({"trees"} if z <= 12 else set()) | ({"parcelles"} if z >= 9 else set())
        for table in level["tables"]:
            assert [a["name"] for a in table["attributes"]] == (["nom"] if table["name"] == "trees"
                                                               else ["code", "surface", "usage"])
        lim = level["tile_limits"]
        for col, row in levels[level["id"]]:
            assert lim["min_col"] <= col <= lim["max_col"] and lim["min_row"] <= row <= lim["max_row"]
        layers = {name for tile in levels[level["id"]].values() for name in tile}
        assert layers == names if z >= 9 else layers <= names  # tippecanoe may drop tiny parcels low down
    # every tree at every level of its table, where the source puts it, with only the requested attribute
    for z in range(6, 13):
        found = layer_features(levels[str(z)], "trees")
        assert len(found) == len(rows["arbres"])
        assert all(set(f["properties"]) == {"nom"} for f in found)
        for tree in rows["arbres"][::7]:
            [tile] = [t for key, t in levels[str(z)].items()
                      if key == tile_of(tree["lon"], tree["lat"], z, 4096)[:2]]
            extent = tile["trees"]["extent"]
            _, _, x, y = tile_of(tree["lon"], tree["lat"], z, extent)
            near = [f for f in tile["trees"]["features"] if f["properties"]["nom"] == tree["nom"]]
            assert near, (z, tree["nom"])
            fx, fy = near[0]["geometry"]["coordinates"]
            assert abs(fx - x) <= 2 and abs(fy - y) <= 2, (z, tree["nom"], (fx, fy), (x, y))
    # the filter: exactly the matching parcels, whole attributes
    expected = {r["code"] for r in rows["parcelles"] if r["surface"] > 10.0 and r["usage"] == "bois"}
    assert 0 < len(expected) < len(rows["parcelles"])
    found = layer_features(levels["13"], "parcelles")
    assert {f["properties"]["code"] for f in found} == expected
    assert all(set(f["properties"]) == {"code", "surface", "usage"} for f in found)
    assert not (tmp_path / "V.work").exists()
    listed = (tmp_path / "V.list").read_text().split("#\n")[1].split()
    assert len(listed) == sum(1 for _ in (tmp_path / "V" / "DATA").rglob("*.tif")) > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_platform_presets(base: Any, tmp_path: Path, preset: str) -> None:
    path, rows = base
    descriptor = build(path, tmp_path, Composition("parcelles", "8", "12"), Composition("arbres", "8", "12"),
                       tippecanoe_options=preset)
    doc, levels = read_pyramid(descriptor)
    assert sorted(levels, key=int) == [str(z) for z in range(8, 13)]
    bottom = levels["12"]
    assert {f["properties"]["nom"] for f in layer_features(bottom, "arbres")} == {r["nom"] for r in rows["arbres"]}
    assert layer_features(bottom, "parcelles")


def test_area_sample(base: Any, tmp_path: Path) -> None:
    path, rows = base
    area = "POLYGON((2.2 48.8, 2.35 48.8, 2.35 48.9, 2.2 48.9, 2.2 48.8))"
    descriptor = build(path, tmp_path, Composition("arbres", "10", "12"), Composition("parcelles", "10", "12"),
                       area=area)
    _, levels = read_pyramid(descriptor)
    inside = {r["nom"] for r in rows["arbres"] if 2.2 <= r["lon"] <= 2.35 and 48.8 <= r["lat"] <= 48.9}
    assert 0 < len(inside) < len(rows["arbres"])
    assert {f["properties"]["nom"] for f in layer_features(levels["12"], "arbres")} == inside
    # parcels are clipped: no tile east of the area's tile column
    east_col = tile_of(2.35, 48.85, 12, 4096)[0]
    assert max(col for col, _ in levels["12"]) <= east_col
    assert layer_features(levels["12"], "parcelles")


def test_options_are_checked() -> None:
    assert tippecanoe_options("-ac -aD -an -S15") == ["-ac", "-aD", "-an", "-S15"]
    assert tippecanoe_options("-S 10 --drop-rate 2 --coalesce") == ["-S10", "--drop-rate=2", "--coalesce"]
    for bad in ("-o /tmp/x.mbtiles", "-e /tmp", "--output-to-directory=/tmp", "-l x", "-S ten", "-az",
                "--feature-filter-file=/etc/passwd", "x.geojson", "-S10 'unclosed"):
        with pytest.raises(WriterError):
            tippecanoe_options(bad)


def test_bad_composition_is_refused_before_anything(base: Any, tmp_path: Path) -> None:
    path, _ = base
    for item, message in ((Composition("absent", "5", "8"), "no table"),
                          (Composition("arbres", "5", "8", attributes=("nope",)), "no attribute"),
                          (Composition("arbres", "5", "8", filter="1=1; DROP TABLE arbres"), "filter"),
                          (Composition("arbres", "5", "8", filter="nom IN (SELECT nom FROM arbres)"), "filter"),
                          (Composition("arbres", "5", "8", filter="inconnu = 3"), "unknown attribute"),
                          (Composition("arbres", "9", "8"), "finer"),
                          (Composition("arbres", "5", "25"), "not in grid"),
                          (Composition("arbres", "5", "8", filter="hauteur > 1000"), "no feature")):
        with pytest.raises(WriterError, match=message):
            build(path, tmp_path, item)
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_nothing(base: Any, tmp_path: Path) -> None:
    path, _ = base
    with pytest.raises(WriterError, match="not an allowed"):
        build(path, tmp_path, Composition("arbres", "5", "8"), tippecanoe_options="-o /tmp/elsewhere.mbtiles")
    # tippecanoe itself fails: a tile cannot be made small enough
    with pytest.raises(WriterError, match="tippecanoe failed"):
        build(path, tmp_path, Composition("parcelles", "5", "12"), tippecanoe_options="--maximum-tile-bytes=50")
    assert list(tmp_path.iterdir()) == []
    # a previous pyramid of that name is replaced by a successful run only
    first = build(path, tmp_path, Composition("arbres", "5", "8"))
    assert Path(first).is_file()
    with pytest.raises(WriterError):
        build_vector_pyramid(path, str(tmp_path), "V", VectorPyramidOptions((Composition("arbres", "5", "8"),)),
                             settings=load_settings(env={}))  # exists, no overwrite
    build_vector_pyramid(path, str(tmp_path), "V", VectorPyramidOptions((Composition("parcelles", "9", "10"),)),
                         settings=load_settings(env={}), overwrite=True)
    doc, levels = read_pyramid(first)
    assert [lv["id"] for lv in doc["levels"]] == ["9", "10"]
    slabs = {p.relative_to(tmp_path / "V").as_posix() for p in (tmp_path / "V" / "DATA").rglob("*.tif")}
    assert slabs == {line.split("/", 1)[1] for line in (tmp_path / "V.list").read_text().split("#\n")[1].split()}


# --- the processing, over real HTTP --------------------------------------------------------------------


def test_processing_over_http(tmp_path: Path, vector_backend: str) -> None:
    """A VECTOR upload integrated into a base, then "Calcul ou mise à jour de pyramide vecteur":
    refused parameters listed at creation; the stored data typed ROK4-PYRAMID-VECTOR with its levels;
    tiles read back from its descriptor; a failed run (tippecanoe refuses) leaves no pyramid."""
    from test_warehouse_support import api_client, wait_for, warehouse_server
    from test_warehouse_vector import BASE, _ok, integrate, upload

    gpkg = tmp_path / "livraison.gpkg"
    rows = make_base(gpkg)
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        delivered = upload(client, {"data/livraison.gpkg": gpkg})
        base = integrate(client, delivered["_id"])
        [processing] = client.get(f"{BASE}/processings",
                                  params={"name": "Calcul ou mise à jour de pyramide vecteur"}).json()
        definition = client.get(f"{BASE}/processings/{processing['_id']}").json()
        assert definition["output_type"]["stored_data"] == "ROK4-PYRAMID-VECTOR"
        assert definition["input_types"]["stored_data"] == ["VECTOR-DB", "ROK4-PYRAMID-VECTOR"]

        def create(parameters: dict[str, Any], name: str = "pyramide") -> httpx.Response:
            return client.post(f"{BASE}/processings/executions", json={
                "processing": processing["_id"], "inputs": {"stored_data": [base["_id"]]},
                "output": {"stored_data": {"name": name, "storage_tags": ["PYRAMIDE"]}}, "parameters": parameters})

        refused = create({"composition": [{"table": "absent", "top_level": "5", "bottom_level": "8"},
                                          {"table": "arbres", "top_level": "5", "bottom_level": "8",
                                           "filter": "nom = 'x'; DROP TABLE arbres"}],
                          "tippecanoe_options": "-S10"})
        assert refused.status_code == 400
        text = json.dumps(refused.json())
        assert "absent" in text and "filter" in text
        refused = create({"top_level": "5", "bottom_level": "8", "tippecanoe_options": "-o /tmp/x.mbtiles"})
        assert refused.status_code == 400 and "not an allowed" in json.dumps(refused.json())

        def run(parameters: dict[str, Any], name: str, expect: str) -> dict[str, Any]:
            execution = _ok(create(parameters, name), 201)
            _ok(client.post(f"{BASE}/processings/executions/{execution['_id']}/launch"))
            done = wait_for(lambda: (e := client.get(f"{BASE}/processings/executions/{execution['_id']}").json())
                            ["status"] in ("SUCCESS", "FAILURE") and e)
            logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
            assert done["status"] == expect, logs
            return {"logs": logs, "stored": client.get(
                f"{BASE}/stored_data/{execution['output']['stored_data']['_id']}").json()}

        done = run({"bottom_level": "12", "top_level": "7", "tippecanoe_options": "-ac -an -S10",
                    "composition": [{"table": "arbres", "attributes": ["nom"], "layer": "trees"},
                                    {"table": "parcelles", "top_level": "10", "filter": "usage = 'pre'"}],
                    "width": 8, "height": 8}, "pyramide", "SUCCESS")
        stored = done["stored"]
        assert stored["type"] == "ROK4-PYRAMID-VECTOR" and stored["status"] == "GENERATED"
        assert stored["type_infos"]["tms"] == "PM"
        assert stored["type_infos"]["levels"] == [str(z) for z in range(7, 13)]  # top first
        assert any("tippecanoe" in line for line in done["logs"])
        from tileserver.publication.store import PublicationStore

        store = PublicationStore(settings.resolved_store_url)
        try:
            descriptor = store.get_stored_data(stored["_id"]).descriptor_url.removeprefix("file://")
        finally:
            store.close()
        doc, levels = read_pyramid(descriptor)
        assert [lv["tiles_per_width"] for lv in doc["levels"]] == [8] * 6
        assert {f["properties"]["nom"] for f in layer_features(levels["12"], "trees")} == \
            {r["nom"] for r in rows["arbres"]}
        assert {f["properties"]["code"] for f in layer_features(levels["12"], "parcelles")} == \
            {r["code"] for r in rows["parcelles"] if r["usage"] == "pre"}
        assert not layer_features(levels["9"], "parcelles")

        failed = run({"bottom_level": "12", "top_level": "5", "tippecanoe_options": "--maximum-tile-bytes=50",
                      "composition": [{"table": "parcelles"}]}, "échec", "FAILURE")
        assert any("tippecanoe failed" in line for line in failed["logs"])
        assert failed["stored"]["status"] != "GENERATED"
        root = Path(descriptor).parent
        assert sorted(p.name for p in root.iterdir() if ".gpkg" not in p.name) == sorted(
            [Path(descriptor).name, Path(descriptor).with_suffix(".list").name, Path(descriptor).stem])


@contextlib.contextmanager
def sdk_vector_pyramid(tmp_path: Path) -> Iterator[SdkRun]:
    """IGN's SDK, unmodified, on a live server: delivery of CANTON, then `generic_vecteur.jsonc`'s
    `mise-en-base` and `création-pyramide`. Yields what later steps (publication) need."""
    from test_warehouse_support import api_client, egpf, warehouse_server, write_ini
    from test_warehouse_vector import SDK_DATA, shapefile

    sdk = pytest.importorskip("sdk_entrepot_gpf")
    dataset = tmp_path / "1_dataset_vector"
    files = shapefile(dataset / "CANTON")
    descriptor = json.loads((Path(sdk.__file__).parent / SDK_DATA / "upload_descriptor.json").read_text())
    (dataset / "upload_descriptor.json").write_text(json.dumps(descriptor))
    workflow = Path(sdk.__file__).parent / "_data/workflows/generic_vecteur.jsonc"
    with warehouse_server(tmp_path) as (url, settings):
        ini = write_ini(tmp_path / "config.ini", url)
        run = SdkRun(url, settings, api_client(url), files[[f.suffix for f in files].index(".shp")],
                     lambda *args: egpf(ini, *args, cwd=tmp_path), workflow)
        result = run.egpf("delivery", str(dataset / "upload_descriptor.json"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        for step in ("mise-en-base", "création-pyramide"):
            run.step(step)
        yield run


@dataclass
class SdkRun:
    url: str
    settings: Any
    client: httpx.Client
    source: Path  # the delivered CANTON.shp
    egpf: Callable[..., Any]  # the SDK's CLI with this run's ini and folder
    workflow: Path

    def step(self, name: str) -> None:
        result = self.egpf("workflow", "-f", str(self.workflow), "-s", name)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def stored(self, type_: str) -> dict[str, Any]:
        from test_warehouse_vector import BASE

        [stored] = [s for s in self.client.get(f"{BASE}/stored_data").json() if s["type"] == type_]
        return self.client.get(f"{BASE}/stored_data/{stored['_id']}").json()

    def file(self, stored_id: str) -> str:
        """The stored data's file (a pyramid's descriptor, a base's GeoPackage)."""
        from tileserver.publication.store import PublicationStore

        store = PublicationStore(self.settings.resolved_store_url)
        try:
            return store.get_stored_data(stored_id).descriptor_url.removeprefix("file://")
        finally:
            store.close()


def test_sdk_generic_vecteur_creation_pyramide(tmp_path: Path) -> None:
    """`création-pyramide` of the SDK's own `generic_vecteur.jsonc` (levels 0 to 9, attributes named as
    in the platform's PostGIS bases: `id` for the key, `wkb_geometry` for the geometry)."""
    from test_warehouse_support import LAST_NAME
    from test_warehouse_vector import read_source

    with sdk_vector_pyramid(tmp_path) as run:
        stored = run.stored("ROK4-PYRAMID-VECTOR")
        assert stored["name"] == f"{LAST_NAME}__Pyramide_vecteur" and stored["status"] == "GENERATED"
        assert stored["type_infos"]["levels"] == [str(z) for z in range(10)]
        doc, levels = read_pyramid(run.file(stored["_id"]))
        source = read_source(run.source)
        assert [t["name"] for t in doc["levels"][-1]["tables"]] == ["canton"]
        assert [a["name"] for a in doc["levels"][-1]["tables"][0]["attributes"]] == \
            ["id", "insee_dep", "insee_reg", "insee_can"]
        found = {}
        for f in layer_features(levels["9"], "canton"):
            assert set(f["properties"]) == {"id", "insee_dep", "insee_reg", "insee_can"}
            found[f["properties"]["insee_can"]] = f["properties"]
        assert set(found) == {r["insee_can"] for r in source}
        for row in source:
            assert (found[row["insee_can"]]["insee_dep"], found[row["insee_can"]]["insee_reg"]) == \
                (row["insee_dep"], row["insee_reg"])


async def test_on_s3(base: Any, tmp_path: Path, s3_server: Any, s3_bucket: str, s3_settings: Any) -> None:
    """ROK4's object layout on moto S3 (slabs `DATA_<level>_<col>_<row>`, list root `bucket/prefix/NAME`),
    the same tiles as on disk; a failed run on S3 leaves no object."""
    from tileserver.rok4.listfile import parse_list
    from tileserver.writer.vector_pyramid import build_vector_pyramid_async

    path, _ = base
    options = VectorPyramidOptions((Composition("arbres", "8", "11"), Composition("parcelles", "10", "11")),
                                   width=2, height=2)
    root = f"s3://{s3_bucket}/vecteur"
    async with Storage(s3_settings) as storage:
        summary = await build_vector_pyramid_async(path, root, "V", options, storage)
        assert summary["descriptor"] == f"{root}/V.json" and summary["type"] == "ROK4-PYRAMID-VECTOR"
        pyramid = await Pyramid.open(f"{root}/V.json", storage)
        on_s3 = {}
        for level in pyramid.descriptor.levels:
            lim = level.tile_limits
            for col in range(lim.min_col, lim.max_col + 1):
                for row in range(lim.min_row, lim.max_row + 1):
                    data = await pyramid.get_tile(level.id, col, row)
                    if data:
                        on_s3[(level.id, col, row)] = mapbox_vector_tile.decode(data)
        before = {o["Key"] for o in s3_server.s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
        with pytest.raises(WriterError, match="tippecanoe failed"):
            await build_vector_pyramid_async(path, root, "W", VectorPyramidOptions(
                (Composition("parcelles", "5", "12"),), tippecanoe_options="--maximum-tile-bytes=50"), storage)
        after = {o["Key"] for o in s3_server.s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
        assert after == before
    descriptor = json.loads(s3_server.get(s3_bucket, "vecteur/V.json"))
    for level in descriptor["levels"]:
        assert level["storage"] == {"type": "S3", "bucket_name": s3_bucket, "image_prefix": f"vecteur/V/DATA_{level['id']}"}
    listing = parse_list(s3_server.get(s3_bucket, "vecteur/V.list").decode())
    assert listing.roots == {0: f"{s3_bucket}/vecteur/V"}
    assert {f"vecteur/V/{slab}" for _, slab, _ in listing.entries} == {k for k in before if "/DATA_" in k}
    local = await asyncio.to_thread(build, path, tmp_path, *options.composition, width=2, height=2)
    on_disk = (await asyncio.to_thread(read_pyramid, local))[1]
    assert {(lv, c, r): t for lv, tiles in on_disk.items() for (c, r), t in tiles.items()}.keys() == on_s3.keys()
    for (lv, c, r), tile in on_s3.items():
        assert {n: len(layer["features"]) for n, layer in tile.items()} == \
            {n: len(layer["features"]) for n, layer in on_disk[lv][(c, r)].items()}
    # an update on S3 (the base unchanged): links are ROK4 SYMLINK# objects, the tiles are V's
    area = shapely.box(2.2, 48.8, 2.3, 48.85).wkt
    async with Storage(s3_settings) as storage:
        summary = await build_vector_pyramid_async(path, root, "U", VectorPyramidOptions(
            (Composition("arbres", "10", "11"),), width=2, height=2, area=area), storage, update=f"{root}/V.json")
        assert summary["linked_slabs"] > 0 and summary["ancestor"] == f"{root}/V.json"
        updated = await Pyramid.open(f"{root}/U.json", storage)
        for (lv, c, r), tile in on_s3.items():
            data = await updated.get_tile(lv, c, r)
            assert {n: len(layer["features"]) for n, layer in mapbox_vector_tile.decode(data).items()} == \
                {n: len(layer["features"]) for n, layer in tile.items()}
    listing = parse_list(s3_server.get(s3_bucket, "vecteur/U.list").decode())
    assert listing.roots == {0: f"{s3_bucket}/vecteur/U", 1: f"{s3_bucket}/vecteur/V"}
    linked = [slab for root_index, slab, _ in listing.entries if root_index == 1]
    assert len(linked) == summary["linked_slabs"]
    for slab in linked:
        assert s3_server.get(s3_bucket, f"vecteur/U/{slab}") == f"SYMLINK#{s3_bucket}/vecteur/V/{slab}".encode()


def test_crowded_tiles_are_named_in_the_logs(tmp_path: Path) -> None:
    """More than 5 000 features in a tile (the platform docs' first cause of failure) is warned about,
    tile by tile; the count (read from the tile's bytes) is the decoded tile's."""
    rng = np.random.default_rng(5)
    lons, lats = 2.30 + rng.random(6000) * 0.02, 48.85 + rng.random(6000) * 0.01
    path = tmp_path / "dense.gpkg"
    pyogrio.raw.write(path, np.array(shapely.to_wkb(shapely.points(lons, lats)), dtype=object),
                      [np.arange(6000, dtype=np.int64)], ["n"], layer="dense", driver="GPKG", geometry_type="Point",
                      crs="EPSG:4326")
    messages: list[str] = []
    build_vector_pyramid(path, str(tmp_path / "out"), "D", VectorPyramidOptions((Composition("dense", "10", "11"),)),
                         settings=load_settings(env={}), emit=messages.append)
    _, levels = read_pyramid(str(tmp_path / "out" / "D.json"))
    crowded = {(lv, c, r): len(t["dense"]["features"]) for lv, tiles in levels.items() for (c, r), t in tiles.items()
               if len(t["dense"]["features"]) > 5000}
    assert crowded  # the level-10 tile holds them all
    warned = [m for m in messages if m.startswith("warning: tile")]
    assert sorted(warned) == sorted(f"warning: tile {lv}/{c}/{r} holds {n} features (more than 5000: generalise "
                                    f"more, see tippecanoe_options)" for (lv, c, r), n in crowded.items())


async def test_cli_registers_a_vector_pyramid_typed_vector(base: Any, tmp_path: Path, monkeypatch: Any,
                                                            capsys: Any) -> None:
    """`tileserver stored-data add` on a vector pyramid: a ROK4-PYRAMID-VECTOR with tms and levels
    (it was typed raster, with raster fields)."""
    from test_warehouse_support import BASE as API_BASE
    from test_warehouse_support import app_with_user

    from tileserver.cli import main

    path, _ = base
    descriptor = await asyncio.to_thread(build, path, tmp_path / "pyramids", Composition("arbres", "6", "9"))
    async with app_with_user(tmp_path) as client:
        monkeypatch.setenv("TILESERVER_DATA_DIR", client.settings.data_dir)
        assert await asyncio.to_thread(main, ["stored-data", "add", descriptor, "--name", "arbres", "--json"]) == 0
        registered = json.loads(capsys.readouterr().out)
        stored = (await client.get(f"{API_BASE}/stored_data/{registered['_id']}")).json()
    assert stored["type"] == "ROK4-PYRAMID-VECTOR" and stored["status"] == "GENERATED"
    assert stored["type_infos"] == {"tms": "PM", "levels": ["6", "7", "8", "9"]}


# --- updates ("mise à jour"): the area recomputed, the rest shared with the updated pyramid ---------


def move_tree(path: Path, fid: int, lon: float, lat: float, added: str | None = None) -> None:
    """Move tree `fid` to (lon, lat) in the base; with `added`, also a new tree of that name there."""
    import sqlite3

    from tileserver.vector.gpkgbinary import encode, register_functions

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)
    con = sqlite3.connect(path)
    register_functions(con)
    [(srs_id,)] = con.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = 'arbres'").fetchall()
    [(column,)] = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = 'arbres'").fetchall()
    con.execute(f'UPDATE arbres SET "{column}" = ? WHERE fid = ?', (encode(shapely.Point(x, y), srs_id), fid))
    if added:
        con.execute(f'INSERT INTO arbres ("{column}", nom, hauteur) VALUES (?, ?, 7)',
                    (encode(shapely.Point(x + 30.0, y + 30.0), srs_id), added))
    con.commit()
    con.close()


def points_of(tiles: dict[tuple[int, int], dict[str, Any]], layer: str, zoom: int) -> dict[str, tuple[float, float]]:
    """Each point feature of a layer by `nom`, as lon/lat (from its tile and pixel)."""
    out = {}
    for (col, row), tile in tiles.items():
        found = tile.get(layer, {})
        for f in found.get("features", []):
            x, y = f["geometry"]["coordinates"]
            if 0 <= x < found["extent"] and 0 <= y < found["extent"]:
                n = 2 ** zoom
                lon = (col + x / found["extent"]) / n * 360.0 - 180.0
                lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (row + y / found["extent"]) / n))))
                out[f["properties"]["nom"]] = (lon, lat)
    return out


def test_update_recomputes_the_area_and_links_the_rest(base: Any, tmp_path: Path) -> None:
    """A tree moved and a tree added in the base, then an update of `trees` at levels 11–12 over an
    area around them: the new pyramid's tiles show the change there, keep the other layer
    (`parcelles`) in the recomputed tiles, keep levels 8–10 as they were, and the slabs the area does
    not touch are links to the old pyramid's, listed under its root."""
    import os
    import shutil

    source, rows = base
    path = tmp_path / "base.gpkg"
    shutil.copy(source, path)
    out = tmp_path / "pyramids"
    old = build(path, out, Composition("arbres", "8", "12", layer="trees", attributes=("nom",)),
                Composition("parcelles", "10", "12"), name="V1", width=1, height=1)
    # the easternmost tree moves 0.004° east; a tree is added beside it
    east = max(range(len(rows["arbres"])), key=lambda i: rows["arbres"][i]["lon"])
    tree = rows["arbres"][east]
    lon, lat = tree["lon"] + 0.004, tree["lat"]
    move_tree(path, east + 1, lon, lat, added="nouvel arbre")
    area = shapely.box(tree["lon"] - 0.002, lat - 0.002, lon + 0.002, lat + 0.002).wkt
    with pytest.raises(WriterError, match="width/height"):
        build_vector_pyramid(path, str(out), "V2", VectorPyramidOptions(
            (Composition("arbres", "11", "12", layer="trees", attributes=("nom",)),), area=area),
            settings=load_settings(env={}), update=old)
    new = build(path, out, Composition("arbres", "11", "12", layer="trees", attributes=("nom",)), name="V2",
                area=area, width=1, height=1, update=old)
    old_doc, old_tiles = read_pyramid(old)
    doc, tiles = read_pyramid(new)
    assert [lv["id"] for lv in doc["levels"]] == [str(z) for z in range(8, 13)]
    assert [sorted(t["name"] for t in lv["tables"]) for lv in doc["levels"]] == \
        [sorted(t["name"] for t in lv["tables"]) for lv in old_doc["levels"]]
    for z in (11, 12):
        before, after = points_of(old_tiles[str(z)], "trees", z), points_of(tiles[str(z)], "trees", z)
        assert set(after) == set(before) | {"nouvel arbre"}
        assert abs(after[tree["nom"]][0] - lon) < 1e-3 and abs(after[tree["nom"]][1] - lat) < 1e-3
        assert abs(before[tree["nom"]][0] - tree["lon"]) < 1e-3
        assert {k: v for k, v in after.items() if k not in (tree["nom"], "nouvel arbre")} == \
            {k: v for k, v in before.items() if k != tree["nom"]}
        # the other layer is kept whole in the recomputed tiles
        assert sorted(f["properties"]["code"] for f in layer_features(tiles[str(z)], "parcelles")) == \
            sorted(f["properties"]["code"] for f in layer_features(old_tiles[str(z)], "parcelles"))
    for z in (8, 9, 10):  # levels the update does not compose: the old pyramid's
        assert points_of(tiles[str(z)], "trees", z) == points_of(old_tiles[str(z)], "trees", z)
    # slabs: untouched ones are links to V1's real slabs; the touched ones are new files
    linked = recomputed = 0
    for slab in (out / "V2" / "DATA").rglob("*.tif"):
        level = slab.relative_to(out / "V2" / "DATA").parts[0]
        if os.path.islink(slab):
            linked += 1
            assert slab.resolve().is_relative_to((out / "V1").resolve())
            assert slab.resolve().read_bytes() == (out / "V1" / slab.relative_to(out / "V2")).read_bytes()
        else:
            recomputed += 1
            assert level in ("11", "12")
    assert linked > 0 and recomputed > 0
    [roots, listed] = (out / "V2.list").read_text().split("#\n")
    assert roots.splitlines()[1] == f"1={out / 'V1'}"
    lines = listed.split()
    assert sum(1 for line in lines if line.startswith("1/")) == linked
    assert sum(1 for line in lines if line.startswith("0/")) == recomputed


def test_update_over_http(tmp_path: Path) -> None:
    """The processing with both inputs (the base, changed by an integration `.update`, and the
    pyramid): a new ROK4-PYRAMID-VECTOR stored data whose recomputed area shows the change, the old
    one untouched; mismatched grid and two pyramids refused at creation."""
    from test_warehouse_support import api_client, wait_for, warehouse_server
    from test_warehouse_vector import BASE, _ok, integrate, upload

    gpkg = tmp_path / "livraison.gpkg"
    rows = make_base(gpkg)
    east = max(range(len(rows["arbres"])), key=lambda i: rows["arbres"][i]["lon"])
    tree = rows["arbres"][east]
    lon, lat = tree["lon"] + 0.004, tree["lat"]
    change = tmp_path / "arbres.update.geojson"
    change.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"fid": east + 1, "nom": tree["nom"], "hauteur": tree["hauteur"]},
         "geometry": {"type": "Point", "coordinates": [lon, lat]}}]}))
    area = shapely.box(tree["lon"] - 0.002, lat - 0.002, lon + 0.002, lat + 0.002).wkt
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        base = integrate(client, upload(client, {"data/livraison.gpkg": gpkg})["_id"])
        [processing] = client.get(f"{BASE}/processings",
                                  params={"name": "Calcul ou mise à jour de pyramide vecteur"}).json()
        definition = client.get(f"{BASE}/processings/{processing['_id']}").json()
        assert definition["input_types"]["stored_data"] == ["VECTOR-DB", "ROK4-PYRAMID-VECTOR"]
        tms = next(p for p in definition["parameters"] if p["name"] == "tms")
        assert tms["constraints"]["enum"][0] == "PM" and "LAMB93" not in tms["constraints"]["enum"]

        def run(inputs: list[str], parameters: dict[str, Any], name: str) -> dict[str, Any]:
            execution = _ok(client.post(f"{BASE}/processings/executions", json={
                "processing": processing["_id"], "inputs": {"stored_data": inputs},
                "output": {"stored_data": {"name": name}}, "parameters": parameters}), 201)
            _ok(client.post(f"{BASE}/processings/executions/{execution['_id']}/launch"))
            done = wait_for(lambda: (e := client.get(f"{BASE}/processings/executions/{execution['_id']}").json())
                            ["status"] in ("SUCCESS", "FAILURE") and e)
            logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
            assert done["status"] == "SUCCESS", logs
            return client.get(f"{BASE}/stored_data/{execution['output']['stored_data']['_id']}").json()

        trees = {"table": "arbres", "layer": "trees", "attributes": ["nom"]}
        first = run([base["_id"]], {"composition": [{**trees, "top_level": "9", "bottom_level": "12"}],
                                    "width": 2, "height": 2}, "v1")
        refused = client.post(f"{BASE}/processings/executions", json={
            "processing": processing["_id"], "inputs": {"stored_data": [base["_id"], first["_id"], first["_id"]]},
            "output": {"stored_data": {"name": "x"}}, "parameters": {"tms": "LAMB93", "top_level": "5",
                                                                     "bottom_level": "8"}})
        assert refused.status_code == 400
        text = json.dumps(refused.json())
        assert "at most one pyramid to update" in text and "LAMB93" in text
        refused = client.post(f"{BASE}/processings/executions", json={
            "processing": processing["_id"], "inputs": {"stored_data": [base["_id"], first["_id"]]},
            "output": {"stored_data": {"name": "x"}}, "parameters": {"tms": "PM_5cm", "top_level": "5",
                                                                     "bottom_level": "8"}})
        assert refused.status_code == 400 and "is on grid PM, not PM_5cm" in json.dumps(refused.json())

        delivered = upload(client, {"maj/arbres.update.geojson": change}, srs="EPSG:4326")  # reprojected
        integrate(client, delivered["_id"], existing=base["_id"])
        second = run([first["_id"], base["_id"]], {"composition": [{**trees, "top_level": "11",
                                                                    "bottom_level": "12"}], "area": area}, "v2")
        assert second["type"] == "ROK4-PYRAMID-VECTOR" and second["_id"] != first["_id"]
        assert second["type_infos"] == first["type_infos"]
        from tileserver.publication.store import PublicationStore

        store = PublicationStore(settings.resolved_store_path)
        try:
            paths = [store.get_stored_data(s["_id"]).descriptor_url.removeprefix("file://") for s in (first, second)]
        finally:
            store.close()
        (_, old_tiles), (doc, tiles) = read_pyramid(paths[0]), read_pyramid(paths[1])
        assert [lv["tiles_per_width"] for lv in doc["levels"]] == [2] * 4
        for z in (11, 12):
            before, after = points_of(old_tiles[str(z)], "trees", z), points_of(tiles[str(z)], "trees", z)
            assert abs(before[tree["nom"]][0] - tree["lon"]) < 1e-3 and abs(after[tree["nom"]][0] - lon) < 1e-3
            assert set(after) == set(before)
        for z in (9, 10):
            assert points_of(tiles[str(z)], "trees", z) == points_of(old_tiles[str(z)], "trees", z)
        assert client.get(f"{BASE}/stored_data/{first['_id']}").json()["status"] == "GENERATED"


def test_parallelization_packs_the_same_pyramid(base: Any, tmp_path: Path) -> None:
    """parallelization 2 (tippecanoe threads and -P, slabs packed by 2 threads) writes the slabs
    parallelization 1 writes, each tile with the same features."""
    path, _ = base
    items = (Composition("arbres", "8", "12"), Composition("parcelles", "10", "12"))
    one = read_pyramid(build(path, tmp_path / "one", *items, width=2, height=2))
    two = read_pyramid(build(path, tmp_path / "two", *items, width=2, height=2, parallelization=2))
    assert one[0] == two[0]  # descriptors: levels, limits, tables
    for level, tiles in one[1].items():
        assert tiles.keys() == two[1][level].keys()
        for key, tile in tiles.items():
            assert {n: sorted(json.dumps(f["properties"], sort_keys=True) for f in layer["features"])
                    for n, layer in tile.items()} == \
                {n: sorted(json.dumps(f["properties"], sort_keys=True) for f in layer["features"])
                 for n, layer in two[1][level][key].items()}
    assert sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tif")) == \
        sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.tif"))
