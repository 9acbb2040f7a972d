"""`tileserver layers …` and `tileserver keys …` against a store in a temporary data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apputil import PYRAMIDS, layer_descriptor

from tileserver.cli import main
from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore

SCAN = layer_descriptor("SCAN1000")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("TILESERVER_CONFIG", "TILESERVER_STORE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TILESERVER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stored(data_dir: Path) -> PublicationStore:
    return PublicationStore(str(data_dir / "store.sqlite"))


def test_add_show_list_update_remove(data_dir: Path, tmp_path: Path, capsys) -> None:
    legacy = {**SCAN, "wms": {"authorized": False, "crs": ["EPSG:2154"]}}
    path = write(tmp_path / "scan.json", legacy)
    assert run(capsys, "layers", "add", "scan", str(path), "--check")[0] == 0
    code, out, _ = run(capsys, "layers", "show", "scan")
    assert code == 0 and json.loads(out) == parse_layer("scan", legacy).to_descriptor()
    assert json.loads(out)["wms"] == {"enabled": False} and json.loads(out)["extra_crs"] == ["EPSG:2154"]

    code, _, err = run(capsys, "layers", "add", "scan", str(path))
    assert code == 1 and "already exists" in err
    write(path, {**SCAN, "title": "Renamed"})
    assert run(capsys, "layers", "update", "scan", str(path))[0] == 0
    code, out, _ = run(capsys, "layers", "list", "--json")
    assert [(d["id"], d["title"]) for d in json.loads(out)] == [("scan", "Renamed")]
    code, out, _ = run(capsys, "layers", "list")
    assert out.split()[:2] == ["scan", "open"] and "Renamed" in out

    assert run(capsys, "layers", "remove", "scan")[0] == 0
    code, _, err = run(capsys, "layers", "remove", "scan")
    assert code == 1 and "no layer scan" in err
    assert run(capsys, "layers", "show", "scan")[0] == 1
    code, _, err = run(capsys, "layers", "update", "scan", str(path))
    assert code == 1 and "no layer scan" in err


def test_bad_descriptor_names_file_and_field(data_dir: Path, tmp_path: Path, capsys) -> None:
    bad_level = write(tmp_path / "bad.json", {**SCAN, "pyramids": [{**SCAN["pyramids"][0], "bottom_level": "25"}]})
    code, _, err = run(capsys, "layers", "add", "bad", str(bad_level), "--check")
    assert code == 1 and f"{bad_level}: pyramids[0].bottom_level:" in err
    assert run(capsys, "layers", "add", "bad", str(bad_level))[0] == 0  # without --check: syntax only
    code, _, err = run(capsys, "layers", "add", "x", str(write(tmp_path / "t.json", {**SCAN, "title": 3})))
    assert code == 1 and "t.json: title: must be a string" in err
    code, _, err = run(capsys, "layers", "add", "x", str(tmp_path / "missing.json"))
    assert code == 1 and "missing.json: (file): cannot read" in err


def test_restricted_and_keys(data_dir: Path, tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "scan.json", SCAN)
    assert run(capsys, "layers", "add", "scan", str(path), "--restricted")[0] == 0
    code, out, _ = run(capsys, "keys", "create", "partner", "--layers", "scan", "--json")
    created = json.loads(out)
    code, _, err = run(capsys, "keys", "create", "typo", "--layers", "scan,nope")
    assert code == 1 and "no layer nope" in err
    store = stored(data_dir)
    try:
        snapshot = store.snapshot()
        assert snapshot.restricted == {"scan"}
        assert snapshot.key_access == {PublicationStore.hash_key(created["key"]): frozenset({"scan"})}
    finally:
        store.close()
    code, out, _ = run(capsys, "keys", "list", "--json")
    assert [k["id"] for k in json.loads(out)] == [created["id"]] and created["key"] not in out
    assert run(capsys, "keys", "revoke", created["id"])[0] == 0
    code, out, _ = run(capsys, "keys", "list")
    assert "revoked" in out
    assert run(capsys, "keys", "revoke", "nope")[0] == 1


def test_import_directory(data_dir: Path, tmp_path: Path, capsys) -> None:
    directory = tmp_path / "layers"
    write(directory / "SCAN1000.json", SCAN)
    write(directory / "MONTAGNE.json", layer_descriptor("MONTAGNE"))
    write(directory / "broken.json", '{"title": ')
    write(directory / "unknown_key.json", {**SCAN, "authorised": True})
    write(directory / "missing_pyramid.json", {**SCAN, "pyramids": [{**SCAN["pyramids"][0],
                                                                      "path": f"file://{PYRAMIDS}/NOPE.json"}]})
    write(directory / "notes.txt", "not a descriptor")
    code, out, err = run(capsys, "layers", "import", str(directory), "--check")
    assert code == 1
    assert f"{directory / 'broken.json'}: (file): malformed JSON" in err
    assert f"{directory / 'unknown_key.json'}: authorised: unknown key" in err
    assert f"{directory / 'missing_pyramid.json'}: pyramids[0].path: cannot open" in err
    assert "2 imported, 3 failed" in out
    store = stored(data_dir)
    try:
        assert [layer.id for layer in store.list_layers()] == ["MONTAGNE", "SCAN1000"]
    finally:
        store.close()

    for f in ("broken", "unknown_key", "missing_pyramid"):
        (directory / f"{f}.json").unlink()
    code, _, err = run(capsys, "layers", "import", str(directory))
    assert code == 1 and "already exists" in err
    assert run(capsys, "layers", "import", str(directory), "--replace")[0] == 0
    code, _, err = run(capsys, "layers", "import", str(tmp_path / "nowhere"))
    assert code == 1 and "not a directory" in err
