"""FILE backend: local or mounted filesystems; symlinks are followed by the kernel.

Small reads run in the event loop: a page-cached ``open + pread + close`` of a slab index
(4 KiB) measured ~4.5 µs inline against ~78 µs through ``asyncio.to_thread`` (224k vs 12.8k reads/s,
1 MiB: 27k vs 4k/s, this machine). Larger or whole-file reads, writes and listings use threads;
``file_inline_read_max = 0`` sends every read to a thread for slow network filesystems.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

from .backend import Backend
from .errors import InvalidPathError, LinkLoopError, StorageError
from .paths import Scheme, StoragePath

_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp creates 0600


def _raise(exc: OSError, op: str, name: str) -> NoReturn:
    if exc.errno == errno.ELOOP:
        raise LinkLoopError(f"{op} {name}: too many levels of symbolic links") from exc
    raise StorageError(f"{op} {name}: {exc.strerror or exc}") from exc


def _pread(name: str, offset: int, size: int | None) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _ABSENT:  # missing file, or a dangling symlink
            return None
        _raise(exc, "read", name)
    try:
        if size is None:
            size = max(os.fstat(fd).st_size - offset, 0)
        data = os.pread(fd, size, offset)
        if 0 < len(data) < size:  # pread may stop early on some filesystems: finish or hit EOF
            parts = [data]
            got = len(data)
            while got < size and (chunk := os.pread(fd, size - got, offset + got)):
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        return data
    except OSError as exc:
        _raise(exc, "read", name)
    finally:
        os.close(fd)


def _replace_with(name: str, op: str, fill: Callable[[str], None]) -> None:
    """Make `name` atomically: `fill` writes a temporary file beside it, which is renamed over it.
    os.replace swaps the directory entry: a symlink at `name` is replaced, never written through
    (its target may belong to the pyramid this one was updated from)."""
    directory, base = os.path.split(name)
    tmp = None
    try:
        os.makedirs(directory or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory or ".")
        os.close(fd)
        fill(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, name)
        tmp = None
    except OSError as exc:
        _raise(exc, op, name)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write(name: str, data: bytes) -> None:
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as out:
            out.write(data)

    _replace_with(name, "write", fill)


def _copy(source: str, name: str) -> None:
    _replace_with(name, "copy", lambda tmp: shutil.copyfile(source, tmp))


def _symlink(target: str, link: str) -> None:
    """Relative symlink, as ROK4's Perl tools make them (``abs2rel(target, dirname(link))``)."""
    directory = os.path.dirname(os.path.abspath(link))
    relative = os.path.relpath(os.path.abspath(target), directory)
    tmp = os.path.join(directory, f".{os.path.basename(link)}.{uuid.uuid4().hex}.lnk")
    try:
        os.makedirs(directory, exist_ok=True)
        os.symlink(relative, tmp)
        os.replace(tmp, link)
        tmp = ""
    except OSError as exc:
        _raise(exc, "link", link)
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _scan(directory: str) -> list[tuple[str, bool]]:
    """(name, is a real directory) for each entry, sorted; symlinks are never descended into."""
    try:
        with os.scandir(directory) as entries:
            return sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return []
        _raise(exc, "list", directory)


def _close_all(fds: dict[str, tuple[float, int]]) -> None:
    for _, fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class FileHandles:
    """Descriptors of recently read files kept open, so a tile read is one ``pread``.

    ``open`` and ``close`` of a slab cost ~7 µs of system time a tile under load (benchmarks/RESULTS.md).
    A descriptor lives at most `ttl` seconds: a file replaced by another process is seen after that
    (like a cached slab index); this process's own writes, links and deletes drop it at once.
    """

    def __init__(self, maxsize: int = 256, ttl: float = 30.0) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._fds: dict[str, tuple[float, int]] = {}
        weakref.finalize(self, _close_all, self._fds)

    def read(self, name: str, offset: int, size: int) -> bytes | None:
        entry = self._fds.get(name)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            try:
                data = os.pread(entry[1], size, offset)
            except OSError:
                self.drop(name)
            else:
                if len(data) == size or len(data) == 0:
                    return data
                # short read (end of file or a slow filesystem): the generic path finishes it
        elif entry is not None:
            self.drop(name)
        if self.maxsize <= 0:
            return _pread(name, offset, size)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            _raise(exc, "read", name)
        if len(self._fds) >= self.maxsize:
            self._evict(now)
        self._fds[name] = (now + self.ttl, fd)
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            self.drop(name)
            _raise(exc, "read", name)
        if 0 < len(data) < size:
            return _pread(name, offset, size)
        return data

    def _evict(self, now: float) -> None:
        expired = [name for name, (expires, _) in self._fds.items() if expires <= now]
        for name in expired or [next(iter(self._fds))]:  # else the oldest opened
            self.drop(name)

    def drop(self, name: str) -> None:
        entry = self._fds.pop(name, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                os.close(entry[1])

    def drop_under(self, name: str) -> None:
        """Forget `name` and everything below it (a deleted directory)."""
        for key in [k for k in self._fds if k == name or k.startswith(name.rstrip(os.sep) + os.sep)]:
            self.drop(key)

    def close(self) -> None:
        _close_all(self._fds)

    def __len__(self) -> int:
        return len(self._fds)


class FileBackend(Backend):
    """Paths are used as given: which roots may be read is the caller's decision (`is_within`)."""

    def __init__(self, inline_read_max: int = 1 << 20, handles: int = 256, handle_ttl: float = 30.0) -> None:
        self._inline_read_max = inline_read_max
        self.handles = FileHandles(handles, handle_ttl)

    async def read(self, path: StoragePath, offset: int | None = None, size: int | None = None) -> bytes | None:
        if size is not None and size <= self._inline_read_max:
            return self.handles.read(path.key, offset or 0, size)
        return await asyncio.to_thread(_pread, path.key, offset or 0, size)

    async def write(self, path: StoragePath, data: bytes) -> None:
        self.handles.drop(path.key)
        await asyncio.to_thread(_write, path.key, data)
        self.handles.drop(path.key)

    async def close(self) -> None:
        self.handles.close()

    async def put_file(self, path: StoragePath, local: str) -> None:
        self.handles.drop(path.key)
        await asyncio.to_thread(_copy, local, path.key)

    async def get_file(self, path: StoragePath, local: str) -> bool:
        if not os.path.isfile(path.key):
            return False
        await asyncio.to_thread(_copy, path.key, local)
        return True

    async def exists(self, path: StoragePath) -> bool:
        return await self.size(path) is not None

    async def size(self, path: StoragePath) -> int | None:
        try:
            return os.stat(path.key).st_size
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            _raise(exc, "stat", path.key)

    async def delete(self, path: StoragePath) -> None:
        self.handles.drop_under(path.key)
        try:
            os.unlink(path.key)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                _raise(exc, "delete", path.key)

    async def link(self, target: StoragePath, link: StoragePath) -> None:
        if target.scheme is not Scheme.FILE:
            raise InvalidPathError(f"link {link}: a file link cannot point to {target}")
        self.handles.drop(link.key)
        await asyncio.to_thread(_symlink, target.key, link.key)

    async def list(self, prefix: StoragePath) -> AsyncIterator[StoragePath]:
        """Files (and symlinks) whose path starts with the prefix string, directory by directory."""
        wanted = prefix.key
        top = wanted if wanted.endswith(os.sep) else os.path.dirname(wanted)
        if top and not top.endswith(os.sep):
            top += os.sep
        stack = [top]
        while stack:
            directory = stack.pop()
            entries = await asyncio.to_thread(_scan, directory or ".")
            subdirs = []
            for name, is_dir in entries:
                full = directory + name
                if is_dir:
                    if (full + os.sep).startswith(wanted) or wanted.startswith(full + os.sep):
                        subdirs.append(full + os.sep)
                elif full.startswith(wanted):
                    yield prefix.with_key(full)
            stack.extend(reversed(subdirs))
