"""The vector half of the warehouse over real HTTP: VECTOR uploads in every delivered format, the
"Vérification vecteur" check (the SDK's own truncated CANTON fails it by name), the processing
"Intégration de données vecteur livrées en base" (new base, `srs` reprojection, update and delete
of an existing base), WFS configurations and offerings (open and restricted), and IGN's SDK's
`generic_vecteur` workflow driven unmodified, read back with OWSLib's WFS 2.0 client.

Every expected value is read from the delivered files independently, with pyogrio. Tests taking
`vector_backend` run twice: bases as GeoPackage files, then as PostGIS schemas (conftest)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from test_warehouse_support import LAST_NAME, api_client, egpf, wait_for, warehouse_server, write_ini

BASE = "/api/datastores/default"
SDK_DATA = "_data/datasets/1_dataset_vector"


# --- data sets, written with pyogrio (GDAL) ---------------------------------------------------------


def cantons() -> tuple[list[Any], dict[str, np.ndarray]]:
    """Five square cantons around Paris in Lambert 93, with attributes of several types."""
    geoms, rows = [], []
    for i in range(5):
        x, y = 640000.0 + i * 3000.0, 6855000.0 + (i % 2) * 2500.0
        geoms.append(shapely.MultiPolygon([shapely.box(x, y, x + 2500.0, y + 2000.0)]))
        rows.append((f"75{i:02d}", "75", "11", f"Canton n°{i}", 1000 + i * 37, 12.5 * (i + 1)))
    names = ("insee_can", "insee_dep", "insee_reg", "nom", "population", "surface")
    columns = list(zip(*rows, strict=True))
    fields = {n: np.array(c, dtype=object if isinstance(c[0], str) else None)
              for n, c in zip(names, columns, strict=True)}
    return geoms, fields


def write_layer(path: Path, geoms: list[Any] | None, fields: dict[str, np.ndarray], layer: str | None = None,
                crs: str = "EPSG:2154", driver: str | None = None, **options: Any) -> None:
    geometry = None if geoms is None else np.array(shapely.to_wkb(geoms), dtype=object)
    gtype = None if geoms is None else ("MultiPolygon" if geoms[0].geom_type == "MultiPolygon" else
                                        geoms[0].geom_type)
    pyogrio.raw.write(path, geometry, list(fields.values()), list(fields), layer=layer, driver=driver,
                      geometry_type=gtype, crs=crs if geoms is not None else None, **options)


def read_source(path: Path, layer: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """Features of a delivered file as GDAL reads them: properties and geometry."""
    meta, _, geom, data = pyogrio.raw.read(path, layer=layer, **options)
    out = []
    for i in range(len(data[0]) if data else len(geom)):
        props = {str(name).lower(): _plain(column[i]) for name, column in zip(meta["fields"], data, strict=True)}
        props["geometry"] = shapely.from_wkb(geom[i]) if geom is not None else None
        out.append(props)
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def shapefile(folder: Path, name: str = "CANTON") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    geoms, fields = cantons()
    write_layer(folder / f"{name}.shp", geoms, fields, driver="ESRI Shapefile")
    return sorted(folder.glob(f"{name}.*"))


# --- the API, as a producer drives it ------------------------------------------------------------------


def _ok(answer: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    return answer.json() if answer.content else {}


def upload(client: httpx.Client, files: dict[str, Path | bytes], name: str = "vecteur", srs: str = "EPSG:2154",
           wait: str = "CLOSED") -> dict[str, Any]:
    """A VECTOR upload of `files` (path in the upload → content), closed and checked."""
    created = _ok(client.post(f"{BASE}/uploads", json={"name": name, "description": "d", "type": "VECTOR",
                                                        "srs": srs}), 201)
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        _ok(client.post(f"{BASE}/uploads/{created['_id']}/data", params={"path": rel},
                        files={"file": (Path(rel).name, data)}))
    _ok(client.post(f"{BASE}/uploads/{created['_id']}/close"))
    done = wait_for(lambda: (u := client.get(f"{BASE}/uploads/{created['_id']}").json())["status"]
                    in ("CLOSED", "UNSTABLE") and u)
    assert done["status"] == wait, check_logs(client, done["_id"])
    return done


def check_logs(client: httpx.Client, upload_id: str) -> dict[str, list[str]]:
    checks = client.get(f"{BASE}/uploads/{upload_id}/checks").json()
    return {c["check"]["name"]: client.get(f"{BASE}/checks/executions/{c['_id']}/logs").json()
            for group in ("passed", "failed") for c in checks[group]}


def integration(client: httpx.Client) -> str:
    [found] = client.get(f"{BASE}/processings", params={"name": "Intégration de données vecteur livrées en base"}).json()
    return found["_id"]


def integrate(client: httpx.Client, upload_id: str, name: str = "base", parameters: dict | None = None,
              existing: str | None = None, expect: str = "SUCCESS") -> dict[str, Any]:
    """Run the integration; the output stored data (GENERATED) or the failed execution's logs."""
    output = {"id": existing} if existing else {"name": name, "storage_tags": ["VECTEUR"]}
    execution = _ok(client.post(f"{BASE}/processings/executions", json={
        "processing": integration(client), "inputs": {"upload": [upload_id]}, "output": {"stored_data": output},
        "parameters": parameters or {}}), 201)
    _ok(client.post(f"{BASE}/processings/executions/{execution['_id']}/launch"))
    done = wait_for(lambda: (e := client.get(f"{BASE}/processings/executions/{execution['_id']}").json())["status"]
                    in ("SUCCESS", "FAILURE") and e)
    logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
    assert done["status"] == expect, logs
    if expect != "SUCCESS":
        return {"logs": logs, "execution": done}
    return client.get(f"{BASE}/stored_data/{execution['output']['stored_data']['_id']}").json()


def base_file(settings: Any, stored_id: str) -> Any:
    """The GeoPackage file of a base (a Path), or its postgresql://…#schema URL (a str)."""
    from tileserver.publication.store import PublicationStore

    store = PublicationStore(settings.resolved_store_url)
    try:
        url = store.get_stored_data(stored_id).descriptor_url
    finally:
        store.close()
    return url if url.startswith("postgresql://") else Path(url.removeprefix("file://"))


def base_size(base: Any) -> int:
    """Bytes of a base: its file, or its schema's tables and indexes as PostgreSQL counts them."""
    if isinstance(base, Path):
        return base.stat().st_size
    import psycopg

    from tileserver.vector import postgis

    conninfo, schema = postgis.split(base)
    with psycopg.connect(conninfo) as con:
        return int(con.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                               "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                               (schema,)).fetchone()[0])


def snapshot(base: Any) -> Any:
    """What a base holds, to show it unchanged: its file's bytes, or its canton rows."""
    if isinstance(base, Path):
        return base.read_bytes()
    return [repr({k: (v.wkb if k == "geometry" else v) for k, v in row.items()}) for row in table_rows(base, "canton")]


def table_rows(path: Any, table: str) -> list[dict[str, Any]]:
    """A base's table as GDAL (GeoPackage) or PostgreSQL (PostGIS) reads it, keyed rows sorted by fid."""
    if isinstance(path, str):
        from tileserver.vector.base import Query
        from tileserver.vector.postgis import PostGISBase

        base = PostGISBase(path)
        try:
            return [{**f.properties, "fid": f.id, "geometry": f.geometry} for f in base.features(Query(table))]
        finally:
            base.close()
    meta, fids, geom, data = pyogrio.raw.read(path, layer=table, return_fids=True)
    rows = []
    for i in range(len(fids)):
        row = {str(n): _plain(c[i]) for n, c in zip(meta["fields"], data, strict=True)}
        row["fid"] = int(fids[i])
        row["geometry"] = shapely.from_wkb(geom[i]) if geom is not None else None
        rows.append(row)
    return sorted(rows, key=lambda r: r["fid"])


def relations(stored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in stored["type_infos"]["relations"]}


# --- formats ------------------------------------------------------------------------------------------


def _compare(base: Path, table: str, source: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    """The base's rows carry the source's attribute values and geometries, in delivery order."""
    rows = table_rows(base, table)
    assert len(rows) == len(source) > 0
    for row, expected in zip(rows, source, strict=True):
        assert {n: row[n] for n in names} == {n: expected[n] for n in names}
        if expected["geometry"] is not None:
            assert shapely.equals_exact(shapely.force_2d(row["geometry"]), expected["geometry"], tolerance=1e-6)


def test_geopackage_with_two_tables(tmp_path: Path, vector_backend: str) -> None:
    """A GeoPackage of two tables (one with names to normalise) becomes a base of two relations."""
    geoms, fields = cantons()
    gpkg = tmp_path / "livraison.gpkg"
    write_layer(gpkg, geoms, fields, layer="CANTON")
    points = [shapely.Point(641000.0 + i * 500, 6856000.0) for i in range(3)]
    write_layer(gpkg, points, {"Libellé-Gare": np.array(["Nord", "Est", "Lyon"], dtype=object)},
                layer="Gares-SNCF", append=True)
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        delivered = upload(client, {"data/livraison.gpkg": gpkg})
        logs = check_logs(client, delivered["_id"])
        assert set(logs) == {"Vérification standard", "Vérification vecteur"}
        text = "\n".join(logs["Vérification vecteur"])
        assert "layer CANTON → table canton: 5 feature(s)" in text and "table gares_sncf: 3 feature(s)" in text
        west, south = delivered["extent"]["coordinates"][0][3]
        assert 2.0 < west < 2.5 and 48.5 < south < 49.0  # around Paris

        stored = integrate(client, delivered["_id"])
        assert stored["type"] == "VECTOR-DB" and stored["status"] == "GENERATED"
        assert stored["storage"] == {"type": "POSTGRESQL", "labels": ["VECTEUR"]}
        assert stored["srs"] == "EPSG:2154" and stored["size"] == base_size(base_file(settings, stored["_id"]))
        found = relations(stored)
        assert set(found) == {"canton", "gares_sncf"}
        assert found["canton"]["type"] == "TABLE" and found["canton"]["primary_key"] == ["fid"]
        assert {"insee_can", "nom", "population", "surface"} <= set(found["canton"]["attributes"])
        assert found["canton"]["attributes"]["population"] == "integer"
        assert "libelle_gare" in found["gares_sncf"]["attributes"]
        base = base_file(settings, stored["_id"])
        _compare(base, "canton", read_source(gpkg, "CANTON"), ("insee_can", "nom", "population", "surface"))
        assert [r["libelle_gare"] for r in table_rows(base, "gares_sncf")] == ["Nord", "Est", "Lyon"]


# --- WFS configurations and offerings -------------------------------------------------------------------


def endpoint_id(client: httpx.Client, technical_name: str) -> str:
    datastore = client.get(BASE).json()
    return next(e["endpoint"]["_id"] for e in datastore["endpoints"] if e["endpoint"]["technical_name"] == technical_name)


def wfs_configuration(stored_id: str, layer_name: str, native: str = "canton", public: str = "canton",
                      **extra: Any) -> dict[str, Any]:
    return {"type": "WFS", "name": f"WFS {layer_name}", "layer_name": layer_name, **extra,
            "type_infos": {"used_data": [{"stored_data": stored_id, "relations": [
                {"native_name": native, "public_name": public, "title": "Cantons", "keywords": ["Vecteur"],
                 "abstract": "Cantons autour de Paris"}]}]}}


@pytest.fixture(scope="module", params=["gpkg", "postgis"])
def sdk_journey(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """IGN's SDK, unmodified: delivery of CANTON (a valid shapefile built here, under the SDK's upload
    name), then `mise-en-base`, `configuration-wfs-bdd`, `publication-wfs-bdd` of its own
    `generic_vecteur.jsonc`; the server stays up for the clients that read the published layer.
    Run once per vector backend (as `vector_backend`, for a whole module's tests)."""
    import apputil

    from tileserver.vector import postgis

    sdk = pytest.importorskip("sdk_entrepot_gpf")
    db_url = "" if request.param == "gpkg" else str(request.getfixturevalue("postgis_url"))
    postgis.configure(db_url)
    apputil.VECTOR_DB_URL = db_url
    tmp_path = tmp_path_factory.mktemp(f"sdk-{request.param}")
    dataset = tmp_path / "1_dataset_vector"
    files = shapefile(dataset / "CANTON")
    descriptor = json.loads((Path(sdk.__file__).parent / SDK_DATA / "upload_descriptor.json").read_text())
    (dataset / "upload_descriptor.json").write_text(json.dumps(descriptor))
    workflow = Path(sdk.__file__).parent / "_data/workflows/generic_vecteur.jsonc"
    try:
        with warehouse_server(tmp_path) as (url, _settings):
            ini = write_ini(tmp_path / "config.ini", url)
            result = egpf(ini, "delivery", str(dataset / "upload_descriptor.json"), cwd=tmp_path)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            for step in ("mise-en-base", "configuration-wfs-bdd", "publication-wfs-bdd"):
                result = egpf(ini, "workflow", "-f", str(workflow), "-s", step, cwd=tmp_path)
                assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            yield {"url": url, "db_url": db_url, "type_name": f"{LAST_NAME}__vecteur_wfs_bdd:canton",
                   "source": read_source(files[[f.suffix for f in files].index(".shp")])}
    finally:
        apputil.VECTOR_DB_URL = ""


@pytest.fixture
def sdk_published(sdk_journey: dict[str, Any]) -> dict[str, Any]:
    """The journey's server, its backend configured again (a test between may have set another)."""
    from tileserver.vector import postgis

    postgis.configure(sdk_journey["db_url"])
    return sdk_journey


def test_sdk_generic_vecteur_workflow_and_owslib(sdk_published: dict[str, Any]) -> None:
    """What the SDK's steps made (upload, VECTOR-DB, open WFS offering), and OWSLib's WFS 2.0 client
    reading back the source's features from the published layer."""
    from owslib.wfs import WebFeatureService

    url, type_name, source = sdk_published["url"], sdk_published["type_name"], sdk_published["source"]
    client = api_client(url)
    [delivered] = client.get(f"{BASE}/uploads").json()
    assert delivered["status"] == "CLOSED" and delivered["type"] == "VECTOR"
    [stored] = client.get(f"{BASE}/stored_data").json()
    assert stored["name"] == f"{LAST_NAME}__Base_intermédiaire" and stored["type"] == "VECTOR-DB"
    assert stored["tags"] == {"tuto": "oui", "tuto_name": "vecteur"} and "canton" in relations(stored)
    [offering] = client.get(f"{BASE}/offerings").json()
    assert offering["status"] == "PUBLISHED" and offering["type"] == "WFS" and offering["open"] is True
    capabilities = next(u["url"] for u in offering["urls"] if u["type"] == "WFS")

    wfs = WebFeatureService(capabilities.split("?")[0], version="2.0.0")
    assert type_name in wfs.contents
    answer = wfs.getfeature(typename=[type_name], outputFormat="application/json")
    collection = json.loads(answer.read())
    features = sorted(collection["features"], key=lambda f: f["properties"]["insee_can"])
    assert len(features) == len(source) == 5
    for feature, expected in zip(features, sorted(source, key=lambda r: r["insee_can"]), strict=True):
        props = feature["properties"]
        for name in ("insee_can", "insee_dep", "insee_reg", "nom", "population", "surface"):
            assert props[name] == expected[name], (name, props, expected)
    hits = client.get("/wfs", params={"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature",
                                      "TYPENAMES": type_name, "RESULTTYPE": "hits"})
    assert hits.status_code == 200 and 'numberMatched="5"' in hits.text


@pytest.mark.skipif(shutil.which("ogr2ogr") is None or shutil.which("ogrinfo") is None,
                    reason="GDAL's command-line tools are not installed (Debian: apt-get install gdal-bin)")
def test_gdal_wfs_and_oapif_read_the_sdk_published_layer(sdk_published: dict[str, Any], tmp_path: Path) -> None:
    """GDAL's WFS and OAPIF drivers on the layer the SDK published: same count and extent as the source."""
    _gdal_reads(sdk_published["url"], sdk_published["type_name"], sdk_published["source"], tmp_path)


def _gdal_reads(url: str, type_name: str, source: list[dict], tmp_path: Path) -> None:
    """ogrinfo -so (count) and ogr2ogr to GeoPackage (count and extent) through WFS 2.0 and OGC API Features."""
    from pyogrio.raw import read as raw_read
    from pyproj import Transformer

    native = shapely.union_all([r["geometry"] for r in source])
    to_crs84 = Transformer.from_crs("EPSG:2154", "OGC:CRS84", always_xy=True).transform
    crs84 = shapely.transform(native, lambda xy: np.column_stack(to_crs84(xy[:, 0], xy[:, 1])))
    # WFS answers in the table's own CRS (EPSG:2154), OGC API Features in CRS84 by default
    for i, (dataset, expected, tolerance) in enumerate(((f"WFS:{url}/wfs?VERSION=2.0.0", native.bounds, 1e-6),
                                                         (f"OAPIF:{url}/ogcapi", crs84.bounds, 1e-7))):
        info = subprocess.run(["ogrinfo", "-ro", "-so", dataset, type_name], capture_output=True, text=True, timeout=120)
        assert info.returncode == 0 and f"Feature Count: {len(source)}" in info.stdout, info.stdout + info.stderr
        out = tmp_path / f"gdal-{i}.gpkg"
        run = subprocess.run(["ogr2ogr", "-f", "GPKG", str(out), dataset, type_name],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        _meta, fids, geometry, _fields = raw_read(out, return_fids=True)
        assert len(fids) == len(source)
        assert shapely.union_all(shapely.from_wkb(geometry)).bounds == pytest.approx(expected, abs=tolerance)


OWS_NS = "{http://www.opengis.net/ows/1.1}"
WFS_NS = "{http://www.opengis.net/wfs/2.0}"


def wgs84_boxes(capabilities: bytes) -> dict[str, tuple[float, ...]]:
    """Feature type name → its WGS84BoundingBox (west, south, east, north) in a WFS 2.0 capabilities."""
    from lxml import etree

    out = {}
    for feature_type in etree.fromstring(capabilities).iter(f"{WFS_NS}FeatureType"):
        box = feature_type.find(f"{OWS_NS}WGS84BoundingBox")
        corners = [box.findtext(f"{OWS_NS}{c}").split() for c in ("LowerCorner", "UpperCorner")]
        out[feature_type.findtext(f"{WFS_NS}Name")] = tuple(float(v) for corner in corners for v in corner)
    return out


def test_stored_extent_and_the_wfs_bbox(tmp_path: Path, vector_backend: str) -> None:
    """The VECTOR-DB stored data's `extent` is the source's (pyogrio's bounds, reprojected here with
    pyproj); a WFS configuration without `type_infos.bbox` advertises that extent as each type's
    WGS84BoundingBox (and OGC API collection extent), one with a bbox advertises the bbox as given."""
    from pyproj import Transformer

    geoms, fields = cantons()
    gpkg = tmp_path / "canton.gpkg"
    write_layer(gpkg, geoms, fields, layer="canton")
    native = pyogrio.read_info(gpkg, layer="canton", force_total_bounds=True)["total_bounds"]
    expected = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform_bounds(*native, densify_pts=21)
    given = {"west": 1.5, "south": 48.25, "east": 3.0, "north": 49.5}
    with warehouse_server(tmp_path) as (url, _settings):
        client = api_client(url)
        stored = integrate(client, upload(client, {"canton.gpkg": gpkg})["_id"])
        ring = stored["extent"]["coordinates"][0]
        extent = (min(x for x, _ in ring), min(y for _, y in ring), max(x for x, _ in ring), max(y for _, y in ring))
        assert extent == pytest.approx(expected, abs=1e-7)
        for name, extra in (("sans_bbox", {}), ("avec_bbox", {"bbox": given})):
            body = wfs_configuration(stored["_id"], name)
            body["type_infos"].update(extra)
            configuration = _ok(client.post(f"{BASE}/configurations", json=body), 201)
            _ok(client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                            json={"endpoint": endpoint_id(client, "gpf-geoserver-wfs"), "open": True}), 201)
        boxes = wgs84_boxes(client.get("/wfs", params={"SERVICE": "WFS", "REQUEST": "GetCapabilities"}).content)
        assert boxes["sans_bbox:canton"] == pytest.approx(expected, abs=1e-7)
        assert boxes["avec_bbox:canton"] == (1.5, 48.25, 3.0, 49.5)
        collection = client.get("/ogcapi/collections/avec_bbox:canton", params={"f": "json"}).json()
        assert collection["extent"]["spatial"]["bbox"] == [[1.5, 48.25, 3.0, 49.5]]


def test_restricted_wfs_offering_needs_a_key(tmp_path: Path) -> None:
    geoms, fields = cantons()
    gpkg = tmp_path / "canton.gpkg"
    write_layer(gpkg, geoms, fields, layer="canton")
    with warehouse_server(tmp_path) as (url, _settings):
        client = api_client(url)
        stored = integrate(client, upload(client, {"canton.gpkg": gpkg})["_id"])
        configuration = _ok(client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "prive")), 201)
        private = endpoint_id(client, "gpf-geoserver-wfs-private")
        refused = client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                              json={"endpoint": private, "open": True})
        assert refused.status_code == 400 and "private endpoint" in refused.text
        offering = _ok(client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                                   json={"endpoint": private, "open": False}), 201)
        assert offering["status"] == "PUBLISHED" and offering["open"] is False

        anonymous = httpx.Client(base_url=url, timeout=30)
        feature = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": "prive:canton",
                   "OUTPUTFORMAT": "application/json"}
        capabilities = anonymous.get("/wfs", params={"SERVICE": "WFS", "REQUEST": "GetCapabilities"})
        assert capabilities.status_code == 200 and "prive:canton" not in capabilities.text
        denied = anonymous.get("/wfs", params=feature)
        assert denied.status_code in (400, 403, 404) and "ExceptionReport" in denied.text

        key = _ok(client.post("/api/users/me/keys", json={"name": "k", "type": "HASH",
                                                          "type_infos": {"hash": "a-key-for-the-wfs-layer"}}), 201)
        assert client.post(f"/api/users/me/keys/{key['_id']}/accesses",
                           json={"offerings": [offering["_id"]]}).status_code in (200, 201)
        served = wait_for(lambda: (a := anonymous.get("/wfs", params={**feature, "apikey": "a-key-for-the-wfs-layer"}))
                          .status_code == 200 and a)
        assert len(served.json()["features"]) == len(geoms)
        assert anonymous.get("/wfs", params=feature).status_code != 200  # still refused without the key


def _zip(files: dict[str, Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files.items():
            archive.write(path, name)
    return buffer.getvalue()


NAMES = ("insee_can", "nom", "population", "surface")


def test_shapefile_pushed_one_by_one_and_zipped(tmp_path: Path) -> None:
    files = shapefile(tmp_path / "shp")
    source = read_source(tmp_path / "shp/CANTON.shp")
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        loose = upload(client, {f"CANTON/{f.name}": f for f in files}, name="loose")
        zipped = upload(client, {"canton.zip": _zip({f"CANTON/{f.name}": f for f in files})}, name="zipped")
        assert loose["extent"] == zipped["extent"]
        for delivered in (loose, zipped):
            stored = integrate(client, delivered["_id"], name=delivered["name"])
            assert set(relations(stored)) == {"canton"} and stored["srs"] == "EPSG:2154"
            _compare(base_file(settings, stored["_id"]), "canton", source, NAMES)
        # a shapefile without its .dbf: the check names the file
        broken = upload(client, {f"CANTON/{f.name}": f for f in files if f.suffix != ".dbf"}, name="broken",
                        wait="UNSTABLE")
        logs = check_logs(client, broken["_id"])["Vérification vecteur"]
        assert any("CANTON/CANTON.shp" in line and ".dbf" in line for line in logs), logs


def test_geojson_and_csv(tmp_path: Path) -> None:
    geoms, fields = cantons()
    geojson = tmp_path / "Cantons-IDF.geojson"
    write_layer(geojson, [shapely.transform(g, lambda c: c / 100000.0) for g in geoms], fields, crs="EPSG:4326",
                driver="GeoJSON")
    wkt_csv = tmp_path / "cantons.csv"
    lines = ["wkt,insee_can,nom,population"] + [
        f'"{shapely.to_wkt(shapely.Polygon([(2.3 + i / 100, 48.8), (2.31 + i / 100, 48.8), (2.31 + i / 100, 48.81)]))}",'
        f"75{i:02d},Canton {i},{1000 + i}" for i in range(4)]
    wkt_csv.write_text("\n".join(lines) + "\n")
    (tmp_path / "cantons.csvt").write_text('"WKT","String","String","Integer"\n')
    lonlat = tmp_path / "gares.csv"
    lonlat.write_text("nom,lon,lat\nNord,2.3553,48.8809\nEst,2.3590,48.8768\nLyon,2.3735,48.8443\n")
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        delivered = upload(client, {"Cantons-IDF.geojson": geojson, "cantons.csv": wkt_csv,
                                    "cantons.csvt": tmp_path / "cantons.csvt", "gares.csv": lonlat}, srs="EPSG:4326")
        stored = integrate(client, delivered["_id"])
        found = relations(stored)
        assert set(found) == {"cantons_idf", "cantons", "gares"}
        assert found["cantons"]["attributes"]["population"] == "integer"  # typed by the .csvt
        assert found["cantons"]["attributes"]["insee_can"] == "character varying"
        base = base_file(settings, stored["_id"])
        _compare(base, "cantons_idf", read_source(geojson), NAMES)
        rows = table_rows(base, "cantons")
        assert [r["nom"] for r in rows] == [f"Canton {i}" for i in range(4)]
        assert [r["population"] for r in rows] == [1000 + i for i in range(4)]
        assert rows[1]["geometry"].equals(shapely.Polygon([(2.31, 48.8), (2.32, 48.8), (2.32, 48.81)]))
        gares = table_rows(base, "gares")
        assert [(r["nom"], r["geometry"].x, r["geometry"].y) for r in gares] == [
            ("Nord", 2.3553, 48.8809), ("Est", 2.3590, 48.8768), ("Lyon", 2.3735, 48.8443)]


def test_sdk_example_canton_is_damaged(tmp_path: Path) -> None:
    """The SDK wheel's CANTON.shp lacks its last byte: the vector check fails, naming the file."""
    sdk = pytest.importorskip("sdk_entrepot_gpf")
    example = Path(sdk.__file__).parent / SDK_DATA / "CANTON"
    with warehouse_server(tmp_path) as (url, _settings):
        client = api_client(url)
        md5 = (Path(sdk.__file__).parent / SDK_DATA / "CANTON.md5").read_bytes()
        created = _ok(client.post(f"{BASE}/uploads", json={"name": "EXAMPLE_DATASET_VECTOR", "description": "d",
                                                            "type": "VECTOR", "srs": "EPSG:2154"}), 201)
        for path in sorted(example.iterdir()):
            _ok(client.post(f"{BASE}/uploads/{created['_id']}/data", params={"path": f"CANTON/{path.name}"},
                            files={"file": (path.name, path.read_bytes())}))
        _ok(client.post(f"{BASE}/uploads/{created['_id']}/md5", files={"file": ("CANTON.md5", md5)}))
        _ok(client.post(f"{BASE}/uploads/{created['_id']}/close"))
        done = wait_for(lambda: (u := client.get(f"{BASE}/uploads/{created['_id']}").json())["status"]
                        in ("CLOSED", "UNSTABLE") and u)
        assert done["status"] == "UNSTABLE" and "extent" not in done
        checks = client.get(f"{BASE}/uploads/{created['_id']}/checks").json()
        assert [c["check"]["name"] for c in checks["passed"]] == ["Vérification standard"]  # md5s match
        [failed] = checks["failed"]
        assert failed["check"]["name"] == "Vérification vecteur"
        logs = client.get(f"{BASE}/checks/executions/{failed['_id']}/logs").json()
        assert any(line.split(" ", 1)[1].startswith("CANTON/CANTON.shp: ") for line in logs), logs
        # an unchecked upload cannot be integrated
        refused = client.post(f"{BASE}/processings/executions", json={
            "processing": integration(client), "inputs": {"upload": [created["_id"]]},
            "output": {"stored_data": {"name": "x"}}, "parameters": {}})
        assert refused.status_code == 400 and "UNSTABLE" in refused.text
        assert client.get(f"{BASE}/stored_data").json() == []


def test_srs_reprojection(tmp_path: Path, vector_backend: str) -> None:
    from pyproj import Transformer

    geoms, fields = cantons()
    gpkg = tmp_path / "canton.gpkg"
    write_layer(gpkg, geoms, fields, layer="canton")
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        delivered = upload(client, {"canton.gpkg": gpkg})
        bad = client.post(f"{BASE}/processings/executions", json={
            "processing": integration(client), "inputs": {"upload": [delivered["_id"]]},
            "output": {"stored_data": {"name": "x"}}, "parameters": {"srs": "EPSG:999999"}})
        assert bad.status_code == 400 and "parameters.srs" in bad.text
        stored = integrate(client, delivered["_id"], parameters={"srs": "EPSG:4326"})
        assert stored["srs"] == "EPSG:4326"
        assert relations(stored)["canton"]["attributes"]["geom"] == "geometry(MultiPolygon,4326)"
        rows = table_rows(base_file(settings, stored["_id"]), "canton")
        to_4326 = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
        for row, source in zip(rows, read_source(gpkg, "canton"), strict=True):
            expected = shapely.transform(source["geometry"], lambda c: np.column_stack(to_4326.transform(*c.T)))
            assert shapely.equals_exact(row["geometry"], expected, tolerance=1e-9)
            assert row["nom"] == source["nom"]
        # an existing base keeps its CRS
        again = client.post(f"{BASE}/processings/executions", json={
            "processing": integration(client), "inputs": {"upload": [delivered["_id"]]},
            "output": {"stored_data": {"id": stored["_id"]}}, "parameters": {"srs": "EPSG:2154"}})
        assert again.status_code == 400 and "only for a new base" in again.text
        # deleting the stored data deletes the base: its file, or its schema
        base = base_file(settings, stored["_id"])
        assert client.delete(f"{BASE}/stored_data/{stored['_id']}").status_code == 204
        if isinstance(base, Path):
            assert not base.exists()
        else:
            import psycopg

            from tileserver.vector import postgis

            conninfo, schema = postgis.split(base)
            with psycopg.connect(conninfo) as con:
                assert con.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None


def _update_geojson(path: Path) -> None:
    features = [
        {"type": "Feature", "properties": {"fid": 2, "nom": "Canton modifié", "population": 4242},
         "geometry": shapely.geometry.mapping(shapely.box(2.40, 48.80, 2.41, 48.81))},
        {"type": "Feature", "properties": {"fid": 9, "nom": "Nouveau canton", "population": 9},
         "geometry": shapely.geometry.mapping(shapely.box(2.42, 48.80, 2.43, 48.81))},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def test_update_and_delete_an_existing_base(tmp_path: Path, vector_backend: str) -> None:
    """`.update`/`.delete` files change a published base in place (WFS sees it at once); `delete: true`
    makes a plain file a delete; a failing change set leaves the base as it was."""
    geoms, fields = cantons()
    gpkg = tmp_path / "canton.gpkg"
    write_layer(gpkg, [shapely.transform(g, lambda c: c / 100000.0 + [-4.0, 0.0]) for g in geoms], fields,
                layer="canton", crs="EPSG:4326")
    changes = tmp_path / "changes"
    changes.mkdir()
    _update_geojson(changes / "canton.update.geojson")
    (changes / "canton.delete.csv").write_text("fid\n4\n")
    (tmp_path / "canton.csv").write_text("fid\n1\n")
    (tmp_path / "canton.update.csv").write_text("fid,inconnue\n3,x\n")
    hits = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": "maj:canton",
            "OUTPUTFORMAT": "application/json"}
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        stored = integrate(client, upload(client, {"canton.gpkg": gpkg}, srs="EPSG:4326")["_id"])
        base = base_file(settings, stored["_id"])
        assert [r["fid"] for r in table_rows(base, "canton")] == [1, 2, 3, 4, 5]
        configuration = _ok(client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "maj")), 201)
        _ok(client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                        json={"endpoint": endpoint_id(client, "gpf-geoserver-wfs"), "open": True}), 201)
        assert len(client.get("/wfs", params=hits).json()["features"]) == 5

        no_base = client.post(f"{BASE}/processings/executions", json={
            "processing": integration(client), "inputs": {"upload": [stored["_id"]]},
            "output": {"stored_data": {"name": "x"}}, "parameters": {"update": True}})
        assert no_base.status_code == 400 and "parameters.update: needs output.stored_data.id" in no_base.text

        delivered = upload(client, {f"maj/{f.name}": f for f in sorted(changes.iterdir())}, srs="EPSG:4326")
        logs = check_logs(client, delivered["_id"])["Vérification vecteur"]
        assert any("(update of table canton)" in line for line in logs), logs
        updated = integrate(client, delivered["_id"], existing=stored["_id"])
        assert updated["_id"] == stored["_id"] and updated["status"] == "GENERATED"
        rows = {r["fid"]: r for r in table_rows(base, "canton")}
        assert sorted(rows) == [1, 2, 3, 5, 9]
        assert (rows[2]["nom"], rows[2]["population"]) == ("Canton modifié", 4242)
        assert rows[2]["geometry"].equals(shapely.box(2.40, 48.80, 2.41, 48.81))
        assert rows[3]["nom"] == read_source(gpkg, "canton")[2]["nom"]  # untouched
        assert updated["size"] == base_size(base)
        served = client.get("/wfs", params=hits).json()["features"]
        assert sorted(f["properties"]["nom"] for f in served) == sorted(r["nom"] for r in rows.values())

        plain = upload(client, {"canton.csv": tmp_path / "canton.csv"}, srs="EPSG:4326")
        integrate(client, plain["_id"], existing=stored["_id"], parameters={"delete": True})
        assert sorted(r["fid"] for r in table_rows(base, "canton")) == [2, 3, 5, 9]

        before = snapshot(base)
        failing = upload(client, {"canton.update.csv": tmp_path / "canton.update.csv"}, srs="EPSG:4326")
        failed = integrate(client, failing["_id"], existing=stored["_id"], expect="FAILURE")
        assert any("inconnue" in line for line in failed["logs"]), failed["logs"]
        after = client.get(f"{BASE}/stored_data/{stored['_id']}").json()
        assert after["status"] == "GENERATED" and snapshot(base) == before


def test_wfs_configuration_is_validated(tmp_path: Path) -> None:
    geoms, fields = cantons()
    gpkg = tmp_path / "canton.gpkg"
    write_layer(gpkg, geoms, fields, layer="canton")
    with warehouse_server(tmp_path) as (url, _settings):
        client = api_client(url)
        stored = integrate(client, upload(client, {"canton.gpkg": gpkg})["_id"])
        unknown_table = client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "a", "communes"))
        assert unknown_table.status_code == 400
        assert "relations[0].native_name: the stored data has no table communes (tables: canton)" in unknown_table.text
        body = wfs_configuration("0b0e0f00-0000-4000-8000-000000000000", "a")
        missing = client.post(f"{BASE}/configurations", json=body)
        assert missing.status_code == 400 and "not found in this datastore" in missing.text
        untitled = wfs_configuration(stored["_id"], "a")
        del untitled["type_infos"]["used_data"][0]["relations"][0]["title"]
        assert "title: a non-empty string" in client.post(f"{BASE}/configurations", json=untitled).text
        bad_name = client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "1a"))
        assert bad_name.status_code == 400 and "layer_name" in bad_name.text
        first = _ok(client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "cantons")), 201)
        assert first["type"] == "WFS" and first["status"] == "UNPUBLISHED"
        again = client.post(f"{BASE}/configurations", json=wfs_configuration(stored["_id"], "cantons"))
        assert again.status_code == 409 and "already used" in again.text
        # a WFS endpoint takes WFS configurations only; the stored data is in use while configured
        raster = client.post(f"{BASE}/configurations/{first['_id']}/offerings",
                             json={"endpoint": endpoint_id(client, "gpf-rok4-server-wmts-tms")})
        assert raster.status_code == 400 and "publishes WMTS-TMS configurations" in raster.text
        assert client.delete(f"{BASE}/stored_data/{stored['_id']}").status_code == 409
        offering = _ok(client.post(f"{BASE}/configurations/{first['_id']}/offerings",
                                   json={"endpoint": endpoint_id(client, "gpf-geoserver-wfs")}), 201)
        urls = {u["type"]: u["url"] for u in offering["urls"]}
        assert urls["WFS"].endswith("/wfs?SERVICE=WFS&VERSION=2.0.0&REQUEST=GetCapabilities")
        assert urls["OGCAPI-FEATURES"].endswith("/ogcapi/collections/cantons:canton/items")
        items = client.get(urls["OGCAPI-FEATURES"], params={"f": "json"})
        assert items.status_code == 200 and len(items.json()["features"]) == len(geoms)
        assert client.get(urls["WFS"]).status_code == 200 and "cantons:canton" in client.get(urls["WFS"]).text
        # unpublished and deconfigured, the base can go: its file is removed
        assert client.delete(f"{BASE}/offerings/{offering['_id']}").status_code == 204
        assert client.delete(f"{BASE}/configurations/{first['_id']}").status_code == 204
        path = base_file(_settings, stored["_id"])
        assert client.delete(f"{BASE}/stored_data/{stored['_id']}").status_code == 204
        assert not path.exists()
