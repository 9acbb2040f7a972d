"""Where the warehouse writes the pyramids it computes: under the data directory, or on S3 when
`warehouse_pyramids` names a bucket (``s3://bucket[/prefix]``), and how one is removed again.

Vector bases (VECTOR-DB stored data) are GeoPackage files, `<id>.gpkg`, beside the pyramids when
those are on disk, else under `<data dir>/bases`: SQLite needs a local file to read and update in
place, so a base never goes to S3 (WFS serves local bases only). With `vector_db_url` set, a base
is a schema of that PostGIS database instead (`vector/postgis.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from tileserver.settings import Settings
from tileserver.storage import Storage


def pyramids_root(settings: Settings) -> str:
    """Root URL of computed pyramids, without a trailing slash (``file:///abs/dir`` or ``s3://…``)."""
    configured = settings.warehouse_pyramids.strip().rstrip("/")
    if configured.startswith("s3://"):
        return configured
    directory = Path(configured.removeprefix("file://")) if configured else Path(settings.data_dir) / "pyramids"
    return f"file://{directory.resolve()}"


def on_s3(settings: Settings) -> bool:
    return pyramids_root(settings).startswith("s3://")


def bases_root(settings: Settings) -> Path:
    """Directory of the vector bases this warehouse writes."""
    home = pyramids_root(settings)
    if home.startswith("file://"):
        return Path(home.removeprefix("file://"))
    return (Path(settings.data_dir) / "bases").resolve()


def base_url(settings: Settings, ident: str) -> str:
    """URL of a new vector base named `ident`: a `file://` GeoPackage, or a schema of the PostGIS
    database `vector_db_url` (`postgresql://user@host:port/db#vb_<hex>`, without the password)."""
    if settings.vector_db_url:
        from tileserver.vector import postgis

        postgis.configure(settings.vector_db_url)
        return postgis.descriptor_url(settings.vector_db_url, postgis.new_schema())
    return f"file://{bases_root(settings) / ident}.gpkg"


def base_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _base_files(url: str, settings: Settings) -> list[Path]:
    """A base of this warehouse and its work files (`.part.gpkg`, SQLite journals); [] for a base
    registered from elsewhere."""
    path = base_path(url)
    if not url.startswith("file://") or path.parent.resolve() != bases_root(settings) or "/" in path.stem:
        return []
    stem = path.name.removesuffix(".gpkg")
    return [*path.parent.glob(f"{stem}.gpkg*"), *path.parent.glob(f"{stem}.part.gpkg*")]


def output_of(descriptor_url: str) -> tuple[str, str]:
    """(output root as the writer takes it, pyramid name) of a descriptor URL."""
    root, _, file_name = descriptor_url.rpartition("/")
    return root.removeprefix("file://"), file_name.removesuffix(".json")


def remove_pyramid(descriptor_url: str, settings: Settings) -> None:
    """Delete a pyramid this warehouse wrote (descriptor, list, slabs, journals, work files); one
    registered from elsewhere (outside the root) is never touched. Blocking: run it in a thread."""
    if descriptor_url.startswith("postgresql://"):
        from tileserver.vector import pgintegrate, postgis

        postgis.configure(settings.vector_db_url)
        if settings.vector_db_url and postgis.public_url(descriptor_url) == postgis.public_url(settings.vector_db_url):
            pgintegrate.drop(descriptor_url)  # only a schema of this warehouse's database
        return
    if descriptor_url.endswith(".gpkg"):
        for path in _base_files(descriptor_url, settings):
            path.unlink(missing_ok=True)
        return
    root, name = output_of(descriptor_url)
    home = pyramids_root(settings)
    if not descriptor_url.endswith(".json") or not name or "/" in name:
        return
    if home.startswith("s3://"):
        if root == home:
            asyncio.run(_remove_objects(f"{home}/{name}", settings))
        return
    directory = Path(root)
    if not descriptor_url.startswith("file://") or directory.resolve() != Path(home.removeprefix("file://")):
        return
    for path in [directory / name, directory / f"{name}.work", *directory.glob(f"{name}.*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def written_bytes(descriptor_url: str, settings: Settings) -> int | None:
    """Bytes a pyramid being written takes so far (its directory, descriptor, list and work files),
    on disk or on S3 (one listing, with sizes, of its objects); None when it cannot be measured."""
    root, name = output_of(descriptor_url)
    if descriptor_url.startswith("s3://") and name and "/" not in name:
        return asyncio.run(_object_bytes(f"{root}/{name}", settings))
    if not descriptor_url.startswith("file://") or not name or "/" in name:
        return None
    directory = Path(root)
    total = 0
    for path in [directory / name, *directory.glob(f"{name}.*")]:
        if path.is_dir():
            for dirpath, _, names in os.walk(path):
                for file_name in names:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, file_name)).st_size
        else:
            with contextlib.suppress(OSError):
                total += path.lstat().st_size
    return total


async def _object_bytes(prefix: str, settings: Settings) -> int:
    async with Storage(settings) as storage:
        return sum([size async for path, size in storage.sizes(prefix) if path[len(prefix):][:1] in ("/", ".")])


async def _remove_objects(prefix: str, settings: Settings) -> None:
    async with Storage(settings) as storage:
        found = [p async for p in storage.list(prefix)]
        for path in found:
            if path[len(prefix):][:1] in ("/", "."):  # NAME/…, NAME.json, NAME.list: not NAMEother
                await storage.delete(path)
