"""FILE backend: local or mounted filesystems; symlinks are followed by the kernel.

Nothing here blocks the event loop. A FIFO where a slab should be would block ``open`` and ``read``
until a writer comes, a hung network mount blocks any call on it: files are opened in threads,
non-blocking, and anything but a regular file is refused; reads, opens and stats run in a bounded
pool of this backend's own threads (a hung mount cannot starve the server's default executor), and a
read not answered within the deadline raises `StorageTimeout` (the stuck thread is left to finish).

One inline read is kept, because it cannot block: a small read of an already open slab asks the
kernel with ``preadv2(RWF_NOWAIT)``, which answers only from the page cache and fails with EAGAIN
(then a thread reads) where it would have to wait for the disk, or EOPNOTSUPP on filesystems that
cannot say (NFS, FUSE…: that file is then always read in a thread). A page-cached tile costs ~5 µs so
against ~40-80 µs through a thread (benchmarks/RESULTS.md). Without RWF_NOWAIT (not Linux) every read
goes to a thread; ``file_inline_read_max = 0`` does that too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

from .backend import Backend
from .errors import InvalidPathError, LinkLoopError, StorageError, StorageTimeout
from .paths import Scheme, StoragePath

_ABSENT = (errno.ENOENT, errno.ENOTDIR)
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "preadv") else 0
T = TypeVar("T")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp creates 0600


def _raise(exc: OSError, op: str, name: str) -> NoReturn:
    if exc.errno == errno.ELOOP:
        raise LinkLoopError(f"{op} {name}: too many levels of symbolic links") from exc
    raise StorageError(f"{op} {name}: {exc.strerror or exc}") from exc


def _open_regular(name: str) -> int | None:
    """A descriptor of `name` if it is a regular file, None if absent; StorageError for anything else.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer) so it can be
    refused; devices and directories are refused too."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in _ABSENT:  # missing file, or a dangling symlink
            return None
        _raise(exc, "read", name)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise StorageError(f"read {name}: {kind}")
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        _raise(exc, "read", name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_fd(fd: int, offset: int, size: int | None, name: str) -> bytes:
    """``size`` bytes at ``offset`` (to the end when None), fewer only at the end of the file."""
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


def _read_path(name: str, offset: int, size: int | None, keep: bool) -> tuple[int, bytes] | None:
    """(descriptor kept open or -1, bytes), or None when absent. Runs in a file thread."""
    fd = _open_regular(name)
    if fd is None:
        return None
    try:
        data = _pread_fd(fd, offset, size, name)
    except BaseException:
        os.close(fd)
        raise
    if not keep:
        os.close(fd)
        fd = -1
    return fd, data


def _read_fd(fd: int, offset: int, size: int, name: str) -> bytes:
    """Read through a descriptor of our own (a dup) and close it. Runs in a file thread."""
    try:
        return _pread_fd(fd, offset, size, name)
    finally:
        os.close(fd)


def _stat_size(name: str) -> int | None:
    try:
        return os.stat(name).st_size
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        _raise(exc, "stat", name)


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError as exc:
        if exc.errno not in _ABSENT:
            _raise(exc, "delete", name)


def _close_late(future: concurrent.futures.Future[Any]) -> None:
    """A descriptor opened for a caller that gave up waiting: nobody will keep it."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, tuple) and result[0] >= 0:
        with contextlib.suppress(OSError):
            os.close(result[0])


def _replace_with(name: str, op: str, fill: Callable[[str], object]) -> None:
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


def _close_all(fds: dict[str, list[Any]]) -> None:
    for entry in fds.values():
        with contextlib.suppress(OSError):
            os.close(entry[1])
    fds.clear()


class FileHandles:
    """Descriptors of recently read regular files kept open, so a tile read is one ``pread``.

    ``open`` and ``close`` of a slab cost ~7 µs of system time a tile under load (benchmarks/RESULTS.md).
    A descriptor lives at most `ttl` seconds: a file replaced by another process is seen after that
    (like a cached slab index); this process's own writes, links and deletes drop it at once.
    Used from the event loop only: threads read through a `dup` of a descriptor, never the
    descriptor itself, which may be closed (and its number reused) while they read.
    """

    def __init__(self, maxsize: int = 256, ttl: float = 30.0) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._fds: dict[str, list[Any]] = {}  # name → [expires, fd, RWF_NOWAIT usable]
        weakref.finalize(self, _close_all, self._fds)

    def entry(self, name: str) -> list[Any] | None:
        entry = self._fds.get(name)
        if entry is not None and entry[0] <= time.monotonic():
            self.drop(name)
            return None
        return entry

    def read_nowait(self, name: str, entry: list[Any], offset: int, size: int) -> bytes | None:
        """The bytes if the kernel has them all in memory; None when a thread must read."""
        buffer = bytearray(size)
        try:
            got = os.preadv(entry[1], (buffer,), offset, _NOWAIT)
        except BlockingIOError:  # EAGAIN: some of it is not in the page cache
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # this filesystem cannot tell: always a thread
                entry[2] = False
            else:
                self.drop(name)  # the thread path reopens it and reports the error
            return None
        if got == size or got == 0:
            return bytes(buffer) if got else b""
        return None  # short: the end of the file, or only part in memory; the thread path knows

    def adopt(self, name: str, fd: int) -> None:
        """Keep a descriptor a thread opened; one is kept per name."""
        if name in self._fds or self.maxsize <= 0:
            os.close(fd)
            return
        now = time.monotonic()
        if len(self._fds) >= self.maxsize:
            self._evict(now)
        self._fds[name] = [now + self.ttl, fd, bool(_NOWAIT)]

    def _evict(self, now: float) -> None:
        expired = [name for name, entry in self._fds.items() if entry[0] <= now]
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

    def __init__(self, inline_read_max: int = 1 << 20, handles: int = 256, handle_ttl: float = 30.0,
                 threads: int = 16, deadline: float = 6.0, bulk_deadline: float = 40.0) -> None:
        self._inline_read_max = inline_read_max
        self.handles = FileHandles(handles, handle_ttl)
        self._threads = max(1, threads)
        self._deadline = deadline  # tile and index reads, stats
        self._bulk_deadline = max(deadline, bulk_deadline)  # whole files and large ranges (writer, lists)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def _in_thread(self, what: str, function: Callable[..., T], *args: Any, deadline: float = 0.0) -> T:
        """`function(*args)` in a file thread, waited for at most the deadline (default: the short one)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="tileserver-file")
        deadline = deadline or self._deadline
        future = self._pool.submit(function, *args)
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.wrap_future(future)
        except BaseException as exc:
            future.add_done_callback(_close_late)  # a descriptor it opens after all is closed
            if isinstance(exc, TimeoutError):
                raise StorageTimeout(f"{what}: no answer from the filesystem within {deadline:g} s") from None
            raise

    async def read(self, path: StoragePath, offset: int | None = None, size: int | None = None) -> bytes | None:
        name, start = path.key, offset or 0
        if size is not None and size <= self._inline_read_max:
            handles = self.handles
            entry = handles.entry(name)
            if entry is not None:
                if entry[2]:
                    data = handles.read_nowait(name, entry, start, size)
                    if data is not None:
                        return data
                    entry = handles.entry(name)  # dropped when the descriptor failed
                if entry is not None:
                    return await self._in_thread(f"read {name}", _read_fd, os.dup(entry[1]), start, size, name)
            if handles.maxsize > 0:
                kept = await self._in_thread(f"read {name}", _read_path, name, start, size, True)
                if kept is None:
                    return None
                handles.adopt(name, kept[0])
                return kept[1]
        small = size is not None and size <= self._inline_read_max
        result = await self._in_thread(f"read {name}", _read_path, name, start, size, False,
                                       deadline=0.0 if small else self._bulk_deadline)
        return None if result is None else result[1]

    async def write(self, path: StoragePath, data: bytes) -> None:
        self.handles.drop(path.key)
        await asyncio.to_thread(_write, path.key, data)
        self.handles.drop(path.key)

    async def close(self) -> None:
        self.handles.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # a thread stuck on a hung mount stays stuck
            self._pool = None

    async def put_file(self, path: StoragePath, local: str) -> None:
        self.handles.drop(path.key)
        await asyncio.to_thread(_copy, local, path.key)

    async def get_file(self, path: StoragePath, local: str) -> bool:
        def get() -> bool:
            if not os.path.isfile(path.key):
                return False
            _copy(path.key, local)
            return True

        return await asyncio.to_thread(get)

    async def exists(self, path: StoragePath) -> bool:
        return await self.size(path) is not None

    async def size(self, path: StoragePath) -> int | None:
        return await self._in_thread(f"stat {path.key}", _stat_size, path.key)

    async def delete(self, path: StoragePath) -> None:
        self.handles.drop_under(path.key)
        await asyncio.to_thread(_unlink, path.key)

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
