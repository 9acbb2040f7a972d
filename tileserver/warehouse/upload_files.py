"""An upload's files on disk: `<uploads>/<id>/data/<path>` for data, `<id>/md5/<name>` for the
md5 files, written through a temporary file so a refused or interrupted push leaves nothing.

Paths come from clients: they are checked to stay inside the upload's root (no `..`, no absolute
path, no backslash or control character).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import bad_request

MAX_PATH = 1024


def checked_path(path: str | None, what: str = "path") -> str:
    """The normalised relative path; 400 for anything that could leave the upload's root."""
    if not path or not isinstance(path, str):
        raise bad_request(f"{what}: a relative file path is required")
    if len(path) > MAX_PATH or any(ord(c) < 32 for c in path) or "\\" in path:
        raise bad_request(f"{what}: {path!r} is not an acceptable file path")
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
