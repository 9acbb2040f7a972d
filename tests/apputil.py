"""Run the real application in tests: in-process (httpx over ASGI, lifespan run) or as uvicorn on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import uvicorn

from tileserver.app import create_app
from tileserver.settings import Settings, load_settings

DATA = Path(__file__).parent / "data"
PYRAMIDS = DATA / "pyramids"


STORE_URL = ""  # the store every make_settings names (conftest's store_backend sets a PostgreSQL one)
VECTOR_DB_URL = ""  # the vector database every make_settings names (conftest's vector_backend sets PostGIS)


def make_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings isolated in tmp_path, ignoring the developer's environment."""
    base = load_settings(env={})
    values = {"data_dir": str(tmp_path / "data"), "demo": False, "admin_token": "secret", "store_url": STORE_URL,
              "vector_db_url": VECTOR_DB_URL, "store_poll_interval": 0.2,
              "admin_roots": ("*",)}  # fixtures live anywhere; tests/test_server_security.py checks the roots
    values.update(overrides)
    return replace(base, **values)


def layer_descriptor(name: str, root: str | None = None, **extra) -> dict:
    """A ROK4 layer descriptor publishing every level of a fixture pyramid."""
    import json

    path = PYRAMIDS / f"{name}.json"
    desc = json.loads(path.read_text())
    cell = {}
    from tileserver.rok4.tms import load_tms

    tms = load_tms(desc["tile_matrix_set"], load_settings(env={}).tms_directory)
    for level in desc["levels"]:
        cell[level["id"]] = tms.get(level["id"]).cell_size
    bottom = min(cell, key=cell.get)
    top = max(cell, key=cell.get)
    url = f"{root}/{name}.json" if root else f"file://{path}"
    out = {"title": f"{name} title", "abstract": f"{name} abstract", "keywords": [name, "ROK4"],
           "pyramids": [{"path": url, "bottom_level": bottom, "top_level": top}]}
    out.update(extra)
    return out


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, its lifespan run, behind an httpx client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: uvicorn.Server, **run_kwargs) -> Iterator[None]:
    """A uvicorn server run in a thread for the block (started when the block begins)."""
    thread = threading.Thread(target=server.run, kwargs=run_kwargs, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """uvicorn on a loopback port in a thread; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    with running(uvicorn.Server(config)):
        yield f"http://127.0.0.1:{port}"
