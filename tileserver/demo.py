"""The embedded default: on first start, a small real ROK4 pyramid is copied to the data directory and published."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tileserver.publication.model import parse_layer
from tileserver.settings import PACKAGE_DIR

if TYPE_CHECKING:
    from tileserver.publication.model import Layer
    from tileserver.runtime import Runtime

DEMO_SOURCE = PACKAGE_DIR / "demo" / "pyramids"
ADMIN_TOKEN_FILE = "admin-token"
DEMO_NAME = "SCAN1000"
DEMO_LAYER: dict[str, Any] = {
    "title": "SCAN 1000 (demo)",
    "abstract": "IGN SCAN 1000 sample, a real ROK4 pyramid (PM grid, PNG RGBA), bundled with tileserver",
    "keywords": ["demo", "SCAN1000", "ROK4"],
    "styles": ["normal"],
    "resampling": "bicubic",
    "get_feature_info": {"type": "PYRAMID"},
    "attribution": {"title": "IGN", "url": "https://www.ign.fr"},
}


def _install(target: Path) -> None:
    if not (target / f"{DEMO_NAME}.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(DEMO_SOURCE / DEMO_NAME, target / DEMO_NAME, dirs_exist_ok=True)
        for suffix in (".list", ".json"):  # descriptor last: a half copy never looks valid
            shutil.copy2(DEMO_SOURCE / f"{DEMO_NAME}{suffix}", target / f"{DEMO_NAME}{suffix}")


async def ensure_demo(runtime: Runtime) -> None:
    """Publish the demo layer once per data directory; a later removal by the user is respected."""
    data_dir = Path(runtime.settings.data_dir).resolve()
    marker = data_dir / ".demo-published"
    if marker.exists():
        return
    target = data_dir / "pyramids"
    await asyncio.to_thread(_install, target)
    descriptor = dict(DEMO_LAYER)
    top, bottom = "0", "10"
    descriptor["pyramids"] = [{"path": f"file://{target / DEMO_NAME}.json", "bottom_level": bottom, "top_level": top}]
    layer = parse_layer(DEMO_NAME, descriptor)
    if runtime.store.get_layer(layer.id) is None:
        runtime.store.add_layer(layer)
    marker.write_text("the demo layer was published once; delete this file to publish it again\n")


def is_demo_layer(layer: Layer | None, data_dir: str | Path) -> bool:
    """The record is the demo as `ensure_demo` published it (not a user's layer of the same name)."""
    if layer is None or layer.id != DEMO_NAME or len(layer.pyramids) != 1:
        return False
    demo_path = f"file://{Path(data_dir).resolve() / 'pyramids' / DEMO_NAME}.json"
    return layer.pyramids[0].path == demo_path and layer.title == DEMO_LAYER["title"]


def demo_admin_token(data_dir: str | Path) -> tuple[str, bool]:
    """The demo's admin token, generated once per data directory into a 0600 file; (token, created now).

    `tileserver serve` calls it when no token is configured, so even the demo never runs an admin
    API that trusts the network (or a browser page, or a local proxy) to be only its operator.
    """
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{ADMIN_TOKEN_FILE}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temporary, path)  # complete or absent: a concurrent start reads the winner's token
            created = True
        except FileExistsError:
            created = False
    finally:
        temporary.unlink(missing_ok=True)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to generate a new admin token")
    return token, created
