"""An upload's files: `<uploads>/<id>/data/<path>` for data, `<id>/md5/<name>` for the md5 files,
under the data directory or on S3 (`warehouse_uploads = s3://bucket/prefix`). A push is received
into a local temporary file first, so a refused or interrupted push leaves nothing.

Checks and executions read images as local files: `local()` gives them (on S3, a copy downloaded
for the time of the work).

Paths come from clients: they are checked to stay inside the upload's root (no `..`, no absolute
path, no backslash or control character).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tileserver.settings import Settings

from .errors import ApiError, bad_request, conflict

MAX_PATH = 1024
MAX_NAME = 255  # bytes of one path component (what file systems and S3 tools accept)


def checked_path(path: str | None, what: str = "path") -> str:
    """The normalised relative path; 400 for anything that could leave the upload's root."""
    if not path or not isinstance(path, str):
        raise bad_request(f"{what}: a relative file path is required")
    if len(path) > MAX_PATH or any(ord(c) < 32 for c in path) or "\\" in path:
        raise bad_request(f"{what}: {path[:100]!r} is not an acceptable file path")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME for part in path.split("/")):
        raise bad_request(f"{what}: a file or directory name has at most {MAX_NAME} bytes")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", "") for part in path.split("/")[:-1]) or ".." in pure.parts:
        raise bad_request(f"{what}: {path!r} must stay inside the upload (no '..', no absolute path)")
    parts = [p for p in pure.parts if p != "."]
    if not parts or path.endswith("/"):
        raise bad_request(f"{what}: {path!r} does not name a file")
    return "/".join(parts)


class UploadFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.md5 = root / "md5"
        self.tmp = root / "tmp"
        self.origins: dict[str, str] = {}  # a local copy's files → the objects they were copied from

    def target(self, section: str, rel: str) -> Path:
        base = self.data if section == "data" else self.md5
        target = (base / rel).resolve()
        if not target.is_relative_to(base.resolve()):  # a symlink planted in the tree
            raise bad_request(f"path: {rel!r} must stay inside the upload")
        return target

    def open_temp(self) -> tuple[Path, Any]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / uuid.uuid4().hex
        return temp, open(temp, "wb")  # noqa: SIM115 - closed by the caller

    def commit(self, temp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def exists(self, section: str, rel: str) -> bool:
        return self.target(section, rel).exists()

    def ensure_free(self, section: str, rel: str) -> None:
        """409 when `rel` is taken: by a file or a directory of that name, or by a file where one of
        its directories would go (`a` then `a/b`, or `a/b` then `a`)."""
        base = self.data if section == "data" else self.md5
        if self.target(section, rel).exists():
            raise _taken(rel)
        parent = base
        for part in rel.split("/")[:-1]:
            parent = parent / part
            if parent.exists() and not parent.is_dir():
                raise _taken(rel, parent.relative_to(base).as_posix())

    def store(self, temp: Path, section: str, rel: str) -> None:
        try:
            self.commit(temp, self.target(section, rel))
        except (FileExistsError, NotADirectoryError, IsADirectoryError):  # a racing push took the name
            raise _taken(rel) from None

    @contextlib.contextmanager
    def local(self) -> Iterator[UploadFiles]:
        yield self

    def delete(self, section: str, rel: str) -> bool:
        target = self.target(section, rel)
        if not target.is_file():
            return False
        target.unlink()
        base = self.data if section == "data" else self.md5
        parent = target.parent
        while parent != base and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return True

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def files(self, section: str = "data") -> list[tuple[str, Path]]:
        """(relative path, file) of every file, sorted."""
        base = self.data if section == "data" else self.md5
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, names in os.walk(base):
            for name in names:
                full = Path(dirpath) / name
                out.append((full.relative_to(base).as_posix(), full))
        return sorted(out)

    def size(self) -> int:
        return sum(f.stat().st_size for section in ("data", "md5") for _, f in self.files(section))

    def tree(self) -> list[dict[str, Any]]:
        """Data files as a tree, md5 files at the root, as the SDK reads it (`name`, `type`, `size`,
        `children`)."""
        return _tree(self.data) + [{"name": rel, "type": "file", "size": f.stat().st_size}
                                   for rel, f in self.files("md5")]


def _taken(rel: str, file: str | None = None) -> ApiError:
    if file is None:
        return conflict(f"{rel} already exists in the upload (as a file or a directory); delete it first")
    return conflict(f"{rel}: {file} is a file of the upload, it cannot also be a directory; delete it first")


def _tree(directory: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        return []
    out = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            children = _tree(entry)
            out.append({"name": entry.name, "type": "directory", "size": sum(c["size"] for c in children),
                        "children": children})
        elif entry.is_file():
            out.append({"name": entry.name, "type": "file", "size": entry.stat().st_size})
    return out


class S3UploadFiles:
    """The same operations on objects `<root>/data/<path>` and `<root>/md5/<name>`; blocking (each
    runs its own short-lived storage client): call them from a thread, as the routes do."""

    def __init__(self, settings: Settings, root: str, staging: Path) -> None:
        self.settings = settings
        self.root = root.rstrip("/")
        self.tmp = staging / "tmp"
        self._staging = staging

    def _run(self, action: Any) -> Any:
        from tileserver.storage import Storage

        async def main() -> Any:
            async with Storage(self.settings) as storage:
                return await action(storage)

        return asyncio.run(main())

    def _url(self, section: str, rel: str = "") -> str:
        return f"{self.root}/{'data' if section == 'data' else 'md5'}/{rel}"

    def open_temp(self) -> tuple[Path, Any]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / uuid.uuid4().hex
        return temp, open(temp, "wb")  # noqa: SIM115 - closed by the caller

    def exists(self, section: str, rel: str) -> bool:
        return bool(self._run(lambda storage: storage.exists(self._url(section, rel))))

    def ensure_free(self, section: str, rel: str) -> None:
        """The same rule as on disk: objects `a` and `a/b` cannot both exist (a local copy could not
        hold them)."""
        async def action(storage: Any) -> str | None:
            url = self._url(section, rel)
            if await storage.exists(url):
                return rel
            async for _ in storage.list(url + "/"):
                return rel
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                if await storage.exists(self._url(section, "/".join(parts[:i]))):
                    return "/".join(parts[:i])
            return None

        clash = self._run(action)
        if clash is not None:
            raise _taken(rel, None if clash == rel else clash)

    def store(self, temp: Path, section: str, rel: str) -> None:
        self._run(lambda storage: storage.put_file(self._url(section, rel), str(temp)))

    def delete(self, section: str, rel: str) -> bool:
        async def action(storage: Any) -> bool:
            url = self._url(section, rel)
            if not await storage.exists(url):
                return False
            await storage.delete(url)
            return True

        return bool(self._run(action))

    def remove_all(self) -> None:
        async def action(storage: Any) -> None:
            for url in [u async for u in storage.list(self.root + "/")]:
                await storage.delete(url)

        self._run(action)
        shutil.rmtree(self._staging, ignore_errors=True)

    def listing(self, section: str = "data") -> list[tuple[str, int]]:
        """(relative path, size) of every file, sorted."""
        async def action(storage: Any) -> list[tuple[str, int]]:
            prefix = self._url(section)
            out = []
            async for url in storage.list(prefix):
                out.append((url[len(prefix):], await storage.size(url) or 0))
            return sorted(out)

        return list(self._run(action))

    def size(self) -> int:
        return sum(size for section in ("data", "md5") for _, size in self.listing(section))

    def tree(self) -> list[dict[str, Any]]:
        root: dict[str, Any] = {}
        for rel, size in self.listing("data"):
            *dirs, name = rel.split("/")
            node = root
            for part in dirs:
                node = node.setdefault(part, {})
            node[name] = size
        return _tree_of(root) + [{"name": rel, "type": "file", "size": size} for rel, size in self.listing("md5")]

    @contextlib.contextmanager
    def local(self) -> Iterator[UploadFiles]:
        """A local copy of every file, removed afterwards; its `origins` name each file by its object
        (a copy's path is new for every run)."""
        directory = Path(tempfile.mkdtemp(prefix="upload-"))
        copy = UploadFiles(directory)

        async def download(storage: Any) -> None:
            for section in ("data", "md5"):
                prefix = self._url(section)
                async for url in storage.list(prefix):
                    target = copy.target(section, checked_path(url[len(prefix):]))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    await storage.get_file(url, str(target))
                    copy.origins[str(target)] = url

        try:
            self._run(download)
            yield copy
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _tree_of(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in sorted(node):
        value = node[name]
        if isinstance(value, dict):
            children = _tree_of(value)
            out.append({"name": name, "type": "directory", "size": sum(c["size"] for c in children),
                        "children": children})
        else:
            out.append({"name": name, "type": "file", "size": value})
    return out


def upload_files(settings: Settings, upload_id: str) -> UploadFiles | S3UploadFiles:
    """An upload's files where the settings keep them."""
    data = Path(settings.data_dir).resolve()
    configured = settings.warehouse_uploads.strip().rstrip("/")
    if configured.startswith("s3://"):
        return S3UploadFiles(settings, f"{configured}/{upload_id}", data / "uploads-staging" / upload_id)
    base = Path(configured.removeprefix("file://")) if configured else data / "uploads"
    return UploadFiles(base.resolve() / upload_id)
