"""Helpers of the warehouse API tests: a server with a user, test rasters in the SDK's dataset
format, and IGN's SDK (`egpf`) driven unmodified through its `--ini` file. No tests here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tifffile
from apputil import DATA, live_server, make_settings

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings
from tileserver.warehouse.accounts import Accounts

LOGIN, PASSWORD, LAST_NAME = "jdupont", "s3cret-pass", "Dupont"
SOURCES = DATA / "sources"


def warehouse_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path, **overrides)


def add_user(settings: Settings, login: str = LOGIN, password: str = PASSWORD, last_name: str = LAST_NAME,
             datastores: tuple[str, ...] = ("default",)) -> None:
    store = PublicationStore(settings.resolved_store_url)
    try:
        Accounts(store).add_user(login, password, "Jean", last_name, f"{login}@example.org", datastores)
    finally:
        store.close()


def token(client: httpx.Client | Any, login: str = LOGIN, password: str = PASSWORD) -> str:
    answer = client.post("/api/token", data={"grant_type": "password", "username": login, "password": password,
                                             "client_id": "gpf-warehouse"})
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


@contextlib.contextmanager
def warehouse_server(tmp_path: Path, **overrides: Any) -> Iterator[tuple[str, Settings]]:
    settings = warehouse_settings(tmp_path, **overrides)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    add_user(settings)
    with live_server(settings) as url:
        yield url, settings


def api_client(url: str, login: str = LOGIN, password: str = PASSWORD) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    client.headers["Authorization"] = f"Bearer {token(client, login, password)}"
    return client


def write_geotiff(path: Path, x0: float, y0: float, res: float, size: int = 200, epsg: int = 2154,
                  seed: int = 0) -> None:
    """An RGB GeoTIFF with its CRS in the GeoKeys (no world file)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.stack([(xx * 255 // size), (yy * 255 // size), rng.integers(0, 255, (size, size))], axis=-1)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    tifffile.imwrite(path, data.astype(np.uint8), photometric="rgb", extratags=[
        (33550, "d", 3, (res, res, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),
        (34735, "H", len(geokeys), geokeys, True),
    ])


def make_dataset(root: Path, name: str = "EXAMPLE_DATASET_RASTER", data_dir: str = "ain") -> Path:
    """A data set in the SDK's descriptor format: SCAN1000 (TIFF + world file) and a GeoTIFF beside it,
    both Lambert 93 at 100 m. Returns the descriptor path."""
    folder = root / data_dir
    folder.mkdir(parents=True)
    shutil.copy(SOURCES / "SCAN1000.tif", folder / "scan1000.tif")
    shutil.copy(SOURCES / "SCAN1000.tfw", folder / "scan1000.tfw")
    write_geotiff(folder / "east.tif", 620000.0, 6580000.0, 100.0)
    descriptor = root / "upload_descriptor.jsonc"
    descriptor.write_text(json.dumps({"datasets": [{
        "data_dirs": [data_dir],
        "upload_infos": {"description": "Jeu de test raster", "name": name, "srs": "EPSG:2154", "type": "RASTER"},
        "comments": ["Ceci est un jeu de données de test contenant des données raster"],
        "tags": {"tuto": "oui"},
    }]}, ensure_ascii=False))
    return descriptor


def write_ini(path: Path, url: str, datastore: str = "default", login: str = LOGIN, password: str = PASSWORD) -> Path:
    path.write_text(f"""[store_authentification]
token_url={url}/api/token
login={login}
password={password}
client_id=gpf-warehouse
client_secret=dummy
nb_attempts=1
sec_between_attempt=0

[store_api]
root_url={url}/api
datastore={datastore}
nb_attempts=1
sec_between_attempt=0

[upload]
nb_sec_between_check_updates=1

[processing_execution]
nb_sec_between_check_updates=1
""")
    return path


def egpf(ini: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """IGN's CLI, unmodified, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDK_ENTREPOT")}
    return subprocess.run([sys.executable, "-m", "sdk_entrepot_gpf", "--ini", str(ini), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def wait_for(predicate: Any, timeout: float = 60.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def fitted_workflow(path: Path, bottom: str = "10", top: str = "0") -> Path:
    """The SDK's own `generic_raster.jsonc` with its levels fitted to the test rasters (100 m)."""
    import sdk_entrepot_gpf

    text = (Path(sdk_entrepot_gpf.__file__).parent / "_data/workflows/generic_raster.jsonc").read_text()
    text = text.replace('"bottom": "18"', f'"bottom": "{bottom}"').replace('"top": "0"', f'"top": "{top}"')
    text = text.replace('"bottom_level": "18"', f'"bottom_level": "{bottom}"')
    text = text.replace('"top_level": "0"', f'"top_level": "{top}"')
    path.write_text(text)
    return path


BASE = "/api/datastores/default"


@contextlib.asynccontextmanager
async def app_with_user(tmp_path: Path, **overrides: Any):
    """The app in-process (httpx over ASGI), a user, and a client carrying their token."""
    from apputil import app_client

    settings = warehouse_settings(tmp_path, **overrides)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    add_user(settings)
    async with app_client(settings) as client:
        answer = await client.post("/api/token", data={"grant_type": "password", "username": LOGIN,
                                                       "password": PASSWORD, "client_id": "x"})
        client.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"
        client.settings = settings  # type: ignore[attr-defined]
        yield client


async def poll(client: Any, path: str, done: Any, timeout: float = 60.0) -> dict:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        body = (await client.get(path)).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still {body}")
        await asyncio.sleep(0.2)


async def closed_upload(client: Any, files: dict[str, Path], md5: str | None = None, name: str = "up",
                        wait_for: str = "CLOSED") -> dict:
    """An upload with `files` (path → local file), closed and checked."""
    upload = (await client.post(f"{BASE}/uploads", json={"name": name, "description": "d", "srs": "EPSG:2154",
                                                          "type": "RASTER"})).json()
    for rel, local in files.items():
        answer = await client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": rel},
                                   files={"file": (local.name, local.read_bytes())})
        assert answer.status_code == 200, answer.text
    if md5 is not None:
        answer = await client.post(f"{BASE}/uploads/{upload['_id']}/md5", files={"file": ("x.md5", md5.encode())})
        assert answer.status_code == 200, answer.text
    assert (await client.post(f"{BASE}/uploads/{upload['_id']}/close")).status_code == 200
    return await poll(client, f"{BASE}/uploads/{upload['_id']}", lambda u: u["status"] == wait_for)


def scan_files() -> dict[str, Path]:
    return {"ain/scan1000.tif": SOURCES / "SCAN1000.tif", "ain/scan1000.tfw": SOURCES / "SCAN1000.tfw"}
