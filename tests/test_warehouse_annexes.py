"""Annexes and client styles over real HTTP: a published annex at its public URL, a configuration's
`extra.styles` (PATCH) naming a style annex, offered next to the vector layer's TileJSON; the
journey row 16 of cartes.gouv.fr ("Gérer les styles" → "Ajouter un style")."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from test_vector_styles import build_vector_tiles
from test_warehouse_support import api_client, warehouse_server

BASE = "/api/datastores/default"
STYLE = {"version": 8, "name": "sobre", "sources": {"v": {"type": "vector", "url": "https://example.org/metadata.json"}},
         "layers": [{"id": "parcs", "type": "fill", "source": "v", "source-layer": "parcs",
                     "paint": {"fill-color": "#2b83ba"}}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = Path(tmp_path_factory.mktemp("annexes"))
    with warehouse_server(tmp) as (url, settings):
        yield url, settings, tmp


@pytest.fixture
def api(live):
    client = api_client(live[0])
    yield client
    client.close()


def add_annexe(api: httpx.Client, content: bytes, path: str, name: str = "style.json", **fields: str) -> httpx.Response:
    return api.post(f"{BASE}/annexes", files={"file": (name, content)}, data={"paths": path, **fields})


def test_annexe_lifecycle_and_public_url(api, live):
    url = live[0]
    created = add_annexe(api, b"<doc/>", "/docs/a.xml,docs/b.xml", name="a.xml", published="true")
    assert created.status_code == 201, created.text
    annexe = created.json()
    assert annexe["paths"] == ["/docs/a.xml", "/docs/b.xml"] and annexe["published"] is True
    assert annexe["mime_type"] in ("application/xml", "text/xml") and annexe["size"] == 6
    ident = annexe["_id"]
    # both paths answer, to anyone, by the datastore's technical name or id
    datastore = api.get(BASE).json()
    for ds in (datastore["technical_name"], datastore["_id"]):
        for path in annexe["paths"]:
            public = httpx.get(f"{url}/annexes/{ds}{path}")
            assert public.status_code == 200 and public.content == b"<doc/>", (ds, path)
            assert public.headers["content-security-policy"] == "sandbox"  # never a page of this origin
    # labels by PATCH (as cartes.gouv.fr adds them), list filters
    patched = api.patch(f"{BASE}/annexes/{ident}", json={"labels": ["type=doc", "datasheet_name=x"]})
    assert patched.status_code == 200 and patched.json()["labels"] == ["type=doc", "datasheet_name=x"]
    assert [a["_id"] for a in api.get(f"{BASE}/annexes", params={"path": "/docs/b.xml"}).json()] == [ident]
    assert [a["_id"] for a in api.get(f"{BASE}/annexes", params={"labels": "type=doc"}).json()] == [ident]
    assert api.get(f"{BASE}/annexes", params={"labels": "type=nothing"}).json() == []
    assert api.get(f"{BASE}/annexes/{ident}/file").content == b"<doc/>"
    # a path is unique in the datastore
    taken = add_annexe(api, b"x", "/docs/a.xml", name="c.xml")
    assert taken.status_code == 409 and "/docs/a.xml" in taken.json()["error_description"][0]
    # the file replaced, then unpublished by label (the SDK's count answer), then deleted
    replaced = api.put(f"{BASE}/annexes/{ident}", files={"file": ("a.xml", b"<doc>2</doc>")})
    assert replaced.status_code == 200 and replaced.json()["size"] == 12
    assert httpx.get(f"{url}/annexes/default/docs/a.xml").content == b"<doc>2</doc>"
    counted = api.post(f"{BASE}/annexes/unpublication", params={"labels": "type=doc"})
    assert counted.status_code == 200 and counted.text == "1"
    assert httpx.get(f"{url}/annexes/default/docs/a.xml").status_code == 404
    assert api.delete(f"{BASE}/annexes/{ident}").status_code == 204
    assert api.get(f"{BASE}/annexes/{ident}").status_code == 404


@pytest.mark.parametrize("paths, fields, problem", [
    ("", {}, "paths: at least one path"),
    ("/a/../b.json", {}, "is not a path"),
    ("/ok.json", {"published": "maybe"}, "published: must be true or false"),
])
def test_annexe_refusals(api, paths, fields, problem):
    answer = add_annexe(api, b"{}", paths, **fields)
    assert answer.status_code == 400, answer.text
    assert problem in " ".join(answer.json()["error_description"])


def test_style_annexe_must_be_a_maplibre_style(api):
    bad = add_annexe(api, json.dumps({"version": 7, "layers": []}).encode(), "/style/bad.json",
                     labels="type=style", published="true")
    assert bad.status_code == 400
    assert any("version: must be 8" in d for d in bad.json()["error_description"])
    not_json = add_annexe(api, b"{nope", "/style/bad.json", labels="type=style")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error_description"][0]


def test_configuration_styles_offered_next_to_the_tilejson(api, live, monkeypatch, capsys):
    """cartes.gouv.fr's sequence: style annex (published, labelled), PATCH extra.styles, PUT of the
    configuration (its metadata) that must keep the styles; the layer offers them at once."""
    from tileserver.cli import main

    url, settings, tmp = live
    descriptor = build_vector_tiles(tmp / "pyramid")
    monkeypatch.setenv("TILESERVER_DATA_DIR", settings.data_dir)
    assert main(["stored-data", "add", str(descriptor), "--name", "vtiles", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["_id"]
    configuration = {"type": "WMTS-TMS", "name": "Vector", "layer_name": "vtiles", "type_infos": {
        "title": "Vector tiles", "abstract": "three tables", "keywords": [],
        "used_data": [{"stored_data": stored, "bottom_level": "13", "top_level": "10"}]}}
    created = api.post(f"{BASE}/configurations", json=configuration)
    assert created.status_code == 201, created.text
    config = created.json()["_id"]
    datastore = api.get(BASE).json()
    endpoint = next(e["endpoint"]["_id"] for e in datastore["endpoints"]
                    if e["endpoint"]["technical_name"] == "gpf-rok4-server-wmts-tms")
    offered = api.post(f"{BASE}/configurations/{config}/offerings", json={"endpoint": endpoint, "open": True})
    assert offered.status_code == 201, offered.text
    # before any style: the default one only
    listed = httpx.get(f"{url}/tms/1.0.0/vtiles/styles.json").json()
    assert [(s["name"], s["current"]) for s in listed] == [("default", True)]

    annexe = add_annexe(api, json.dumps(STYLE).encode(), "style/0b1c_sobre.json", published="true").json()
    assert api.patch(f"{BASE}/annexes/{annexe['_id']}", json={"labels": ["type=style"]}).status_code == 200
    public = f"{url}/annexes/{datastore['technical_name']}/style/0b1c_sobre.json"
    # refusals: an unknown annexe, an annexe that is no style, an unpublished one
    other = add_annexe(api, b"<xml/>", "/style/other.xml", name="other.xml", published="true").json()
    hidden = add_annexe(api, json.dumps(STYLE).encode(), "/style/hidden.json", published="false").json()
    for layers, problem in (([{"annexe_id": "00000000-0000-0000-0000-000000000000"}], "no annexe"),
                            ([{"annexe_id": other["_id"]}], "not JSON"),
                            ([{"annexe_id": hidden["_id"]}], "not published"),
                            ([{"url": "ftp://x/y.json"}], "http(s) URL")):
        refused = api.patch(f"{BASE}/configurations/{config}",
                            json={"extra": {"styles": [{"name": "Sobre", "layers": layers}]}})
        assert refused.status_code == 400 and problem in " ".join(refused.json()["error_description"]), refused.text
    assert api.patch(f"{BASE}/configurations/{config}", json={"type": "WFS"}).status_code == 400

    styles = [{"name": "Très sobre", "current": True, "layers": [{"annexe_id": annexe["_id"]}]},
              {"name": "Ailleurs", "technical_name": "ailleurs", "url": "https://example.org/ailleurs.json"},
              {"name": "SLD only", "layers": [{"name": "parcs", "url": "https://example.org/parcs.sld"}]}]
    patched = api.patch(f"{BASE}/configurations/{config}", json={"extra": {"styles": styles}})
    assert patched.status_code == 200, patched.text
    kept = patched.json()["extra"]["styles"]
    assert kept[0]["technical_name"] == "tres_sobre" and kept[0]["layers"][0]["url"] == public
    assert api.get(f"{BASE}/configurations/{config}").json()["extra"]["styles"] == kept

    def offered_styles() -> list[tuple[str, bool]]:
        return [(s["name"], s["current"]) for s in httpx.get(f"{url}/tms/1.0.0/vtiles/styles.json").json()]

    assert offered_styles() == [("default", False), ("tres_sobre", True), ("ailleurs", False)]
    followed = httpx.get(f"{url}/tms/1.0.0/vtiles/styles/tres_sobre.json", follow_redirects=True)
    assert followed.status_code == 200 and followed.json() == STYLE and str(followed.url) == public
    moved = httpx.get(f"{url}/tms/1.0.0/vtiles/styles/ailleurs.json")
    assert moved.status_code == 302 and moved.headers["location"] == "https://example.org/ailleurs.json"

    # cartes.gouv.fr then PUTs the configuration with the style URL in its metadata: styles stay
    replaced = api.put(f"{BASE}/configurations/{config}", json={
        **configuration, "metadata": [{"format": "application/json", "url": public, "type": "Other"}]})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["extra"]["styles"] == kept
    synced = api.put(f"{BASE}/offerings/{offered.json()['_id']}")  # and synchronises the offering
    assert synced.status_code == 200 and synced.json()["_id"] == offered.json()["_id"]
    assert offered_styles() == [("default", False), ("tres_sobre", True), ("ailleurs", False)]
    # and removing them (PATCH an empty list) leaves the default
    assert api.patch(f"{BASE}/configurations/{config}", json={"extra": {"styles": []}}).status_code == 200
    assert offered_styles() == [("default", True)]


def test_sdk_delivers_and_publishes_annexes(api, live, tmp_path):
    """IGN's SDK, unmodified: `delivery` of an annexe descriptor (paths, labels and published as query
    parameters, `published` as Python's `True`), then `annexe {id} --unpublish` (a PATCH with "False").
    (The SDK's `--unpublish-by-label` tests its string option `is True`, so it only lists.)"""
    from test_warehouse_support import egpf, write_ini

    url = live[0]
    (tmp_path / "sobre.json").write_text(json.dumps(STYLE))
    (tmp_path / "annexes.json").write_text(json.dumps({"annexe": [
        {"file": "sobre.json", "paths": ["sdk/sobre.json", "sdk/alias.json"], "published": True,
         "labels": ["type=style", "from=sdk"]}]}))
    ini = write_ini(tmp_path / "config.ini", url)
    delivered = egpf(ini, "delivery", str(tmp_path / "annexes.json"), cwd=tmp_path)
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr
    listed = api.get(f"{BASE}/annexes", params={"labels": "from=sdk"}).json()
    assert [(a["paths"], a["labels"], a["published"]) for a in listed] == [
        (["/sdk/sobre.json", "/sdk/alias.json"], ["type=style", "from=sdk"], True)]
    assert httpx.get(f"{url}/annexes/default/sdk/alias.json").json() == STYLE
    unpublished = egpf(ini, "annexe", listed[0]["_id"], "--unpublish", cwd=tmp_path)
    assert unpublished.returncode == 0, unpublished.stdout + unpublished.stderr
    assert httpx.get(f"{url}/annexes/default/sdk/alias.json").status_code == 404
