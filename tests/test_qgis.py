"""QGIS (Debian's 3.22, `apt-get install qgis python3-qgis`) as a client of the real server: our WMTS,
WMS and an XYZ layer loaded through QGIS's own providers, rendered offscreen to images with pixels,
and a GetFeatureInfo (application/json) through the provider's identify. QGIS runs in Debian's system
python (/usr/bin/python3, which has `qgis.core`) in a subprocess, with QT_QPA_PLATFORM=offscreen;
skipped where that python has no qgis.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import httpx
import pytest
from apputil import DATA, PYRAMIDS, make_settings
from test_tms_service import AUTH, descriptor_for

SYSTEM_PYTHON = "/usr/bin/python3"


def _has_qgis() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, timeout=120, check=False)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _has_qgis(), reason="QGIS is not installed (Debian: apt-get install --no-install-recommends qgis python3-qgis)"
)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsMapRendererSequentialJob,
                           QgsMapSettings, QgsPointXY, QgsRaster, QgsRasterLayer, QgsRectangle)
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    base = sys.argv[1]
    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    out = {}
    wmts = ("contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/png&layers=SCAN1000&styles=normal"
            f"&tileMatrixSet=PM&url={base}/wmts?SERVICE%3DWMTS%26REQUEST%3DGetCapabilities")
    wms = f"crs=EPSG:3857&format=image/png&layers=SCAN1000&styles=&url={base}/wms"
    xyz = f"type=xyz&url={base}/tms/1.0.0/SCAN1000/{{z}}/{{x}}/{{y}}.png&zmax=10&zmin=0&crs=EPSG:3857"
    extent = QgsRectangle(156543.034, 5792092.255, 234814.551, 5831228.014)  # SCAN1000 at level 10
    for name, uri in (("wmts", wmts), ("wms", wms), ("xyz", xyz)):
        layer = QgsRasterLayer(uri, name, "wms")
        result = {"valid": layer.isValid(), "error": [m.message() for m in layer.error().messageList()]}
        if layer.isValid():
            settings = QgsMapSettings()
            settings.setLayers([layer])
            settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
            settings.setExtent(extent)
            settings.setOutputSize(QSize(512, 256))
            settings.setBackgroundColor(QColor(0, 0, 0, 0))
            job = QgsMapRendererSequentialJob(settings)
            job.start()
            job.waitForFinished()
            image = job.renderedImage()
            image.save(f"{sys.argv[2]}/{name}.png")
            colours = set()
            opaque = 0
            for y in range(0, image.height(), 4):
                for x in range(0, image.width(), 4):
                    pixel = image.pixelColor(x, y)
                    opaque += pixel.alpha() > 0
                    colours.add(pixel.rgba())
            result.update(opaque=opaque, colours=len(colours), errors=[str(e.message) for e in job.errors()])
        out[name] = result
    # GetFeatureInfo through WMS, JSON
    dem = QgsRasterLayer(f"crs=EPSG:2154&format=image/png&layers=RGEALTI&styles=&url={base}/wms", "dem", "wms")
    out["identify_valid"] = dem.isValid()
    if dem.isValid():
        provider = dem.dataProvider()
        centre = dem.extent().center()
        for kind, code in (("feature", QgsRaster.IdentifyFormatFeature), ("text", QgsRaster.IdentifyFormatText)):
            identified = provider.identify(QgsPointXY(centre), code, dem.extent(), 256, 256)
            results = identified.results()
            if kind == "feature":  # {layer index: [QgsFeatureStore]}: the features' attributes
                results = [[str(v) for v in f.attributes()] for stores in results.values() for store in stores
                           for f in store.features()]
            out["identify_" + kind] = {"valid": identified.isValid(), "results": repr(results)[:2000],
                                       "error": [m.message() for m in identified.error().messageList()]}
    app.exitQgis()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The server as `tileserver serve` runs it (its own HTTP protocol: QGIS reads `Content-Type`
    case-sensitively, and uvicorn's default protocol lowers header names)."""
    import threading
    import time

    import uvicorn
    from apputil import free_port

    from tileserver.app import create_app
    from tileserver.server_cli import uvicorn_options

    settings = make_settings(tmp_path_factory.mktemp("qgis"), styles_directory=str(DATA / "styles"))
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": free_port()}
    options.pop("workers", None)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{options['port']}"
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            for name in ("SCAN1000", "RGEALTI"):
                desc = descriptor_for(PYRAMIDS / f"{name}.json", styles=["normal", "hypso"],
                                      get_feature_info={"type": "PYRAMID"})
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def test_qgis_renders_wmts_wms_xyz_and_identifies(base, tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("PYTHONPATH", None)  # Debian's python with its own packages, not the project's venv
    done = subprocess.run([SYSTEM_PYTHON, "-c", SCRIPT, base, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    for name in ("wmts", "wms", "xyz"):
        got = result[name]
        assert got["valid"], (name, got["error"])
        assert not got["errors"], (name, got["errors"])
        assert got["opaque"] > 1000 and got["colours"] > 20, (name, got)  # the map drawn, not blank
    assert result["identify_valid"]
    identified = result["identify_feature"]  # GetFeatureInfo in application/json, parsed by QGIS
    assert identified["valid"] and "176.5" in identified["results"], json.dumps(result)
    assert result["identify_text"]["valid"] and "176.5" in result["identify_text"]["results"]
