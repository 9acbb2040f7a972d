"""IGN's SDK (`sdk_entrepot_gpf` 0.1.46), unmodified, against a live server: delivery of the
project's test rasters, the five steps of its own `generic_raster.jsonc` (levels fitted to the
data), then OWSLib reads the published layers from the offerings' URLs and the tiles are the
stored pyramid's bytes. Also: the SDK's own damaged example data set fails the raster check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_warehouse_support import (
    LAST_NAME,
    api_client,
    egpf,
    fitted_workflow,
    make_dataset,
    warehouse_server,
    write_ini,
)

sdk = pytest.importorskip("sdk_entrepot_gpf")

STEPS = ("pyramide", "configuration-WMTS", "publication-WMTS", "configuration-WMS", "publication-WMS")


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_delivery_and_generic_raster_workflow(tmp_path: Path) -> None:
    from owslib.wms import WebMapService
    from owslib.wmts import WebMapTileService

    descriptor = make_dataset(tmp_path / "dataset")
    with warehouse_server(tmp_path) as (url, _settings):
        ini = write_ini(tmp_path / "config.ini", url)
        _ok(egpf(ini, "delivery", str(descriptor), cwd=tmp_path))
        workflow = fitted_workflow(tmp_path / "generic_raster.jsonc", bottom="10", top="9")
        for step in STEPS:
            _ok(egpf(ini, "workflow", "-f", str(workflow), "-s", step, cwd=tmp_path))

        client = api_client(url)
        base = "/api/datastores/default"
        [upload] = client.get(f"{base}/uploads").json()
        assert upload["status"] == "CLOSED" and upload["tags"] == {"tuto": "oui"}
        [stored] = client.get(f"{base}/stored_data", params={"name": f"{LAST_NAME}__pyramide"}).json()
        assert stored["status"] == "GENERATED" and stored["type_infos"]["levels"] == ["9", "10"]
        assert stored["tags"] == {"tuto": "oui", "tuto_name": "raster"}
        offerings = {o["type"]: o for o in client.get(f"{base}/offerings").json()}
        assert {o["status"] for o in offerings.values()} == {"PUBLISHED"}

        # OWSLib from the offerings' URLs; the tile is the pyramid's own bytes
        wmts_urls = {u["type"]: u["url"] for u in reversed(offerings["WMTS-TMS"]["urls"])}
        wmts = WebMapTileService(wmts_urls["WMTS"])
        layer = f"{LAST_NAME}__raster_wmts"
        assert layer in wmts.contents
        limits = wmts.contents[layer].tilematrixsetlinks["PM"].tilematrixlimits["10"]
        row, col = limits.mintilerow, limits.mintilecol
        tile = wmts.gettile(layer=layer, tilematrixset="PM", tilematrix="10", row=row, column=col,
                            format="image/jpeg").read()
        tms_tile = client.get(f"/tms/1.0.0/{layer}/10/{col}/{row}.jpeg")
        assert tms_tile.status_code == 200 and tms_tile.content == tile
        assert tile == _stored_tile(_settings, stored["_id"], "10", col, row)

        wms = WebMapService(offerings["WMS-RASTER"]["urls"][0]["url"], version="1.3.0")
        wms_layer = f"{LAST_NAME}__raster_wms"
        assert wms_layer in wms.contents
        west, south, east, north = wms.contents[wms_layer].boundingBoxWGS84
        image = wms.getmap(layers=[wms_layer], srs="EPSG:4326", bbox=(south, west, north, east), size=(64, 64),
                           format="image/png").read()
        assert image.startswith(b"\x89PNG")


def _stored_tile(settings, stored_id: str, level: str, col: int, row: int) -> bytes:
    """The tile as the pyramid on disk holds it, read with the project's own reader."""
    import asyncio

    from tileserver.publication.store import PublicationStore
    from tileserver.pyramid import Pyramid, SlabIndexCache
    from tileserver.storage import Storage

    store = PublicationStore(settings.resolved_store_url)
    url = store.get_stored_data(stored_id).descriptor_url
    store.close()

    async def read() -> bytes:
        async with Storage(settings) as storage:
            pyramid = await Pyramid.open(url, storage, SlabIndexCache(), settings.tms_directory)
            return await pyramid.get_tile(level, col, row)

    return asyncio.run(read())


def test_sdk_example_raster_dataset_is_unstable(tmp_path: Path) -> None:
    """Its TIFFs are truncated in the wheel: the raster check names each one and why."""
    example = Path(sdk.__file__).parent / "_data/datasets/3_dataset_raster"
    shutil.copytree(example, tmp_path / "3_dataset_raster")
    with warehouse_server(tmp_path) as (url, _settings):
        ini = write_ini(tmp_path / "config.ini", url)
        result = egpf(ini, "delivery", str(tmp_path / "3_dataset_raster/upload_descriptor.jsonc"), cwd=tmp_path)
        assert result.returncode != 0
        client = api_client(url)
        base = "/api/datastores/default"
        [upload] = client.get(f"{base}/uploads").json()
        assert upload["status"] == "UNSTABLE"
        checks = client.get(f"{base}/uploads/{upload['_id']}/checks").json()
        assert [c["check"]["name"] for c in checks["passed"]] == ["Vérification standard"]
        [failed] = checks["failed"]
        assert failed["check"]["name"] == "Vérification raster"
        logs = client.get(f"{base}/checks/executions/{failed['_id']}/logs").json()
        bad = [line for line in logs if "unreadable raster" in line]
        assert len(bad) == 4 and all("ain/01-2021-09" in line for line in bad), logs
        # nothing else is affected: no stored data, the server still answers
        assert client.get(f"{base}/stored_data").json() == []
        assert client.get("/healthcheck").status_code == 200
