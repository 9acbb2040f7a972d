"""`Storage`: the one object the rest of the server talks to; dispatches by scheme and cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

from ..settings import Settings
from .backend import Backend
from .errors import InvalidPathError, LinkLoopError, StorageError
from .file import FileBackend
from .links import MAX_LINK_SIZE, decode_link, may_be_link
from .paths import Scheme, StoragePath, parse_path
from .retry import RetryPolicy
from .s3 import S3Backend

PathLike = str | StoragePath


class Storage:
    """FILE plus one pooled S3 backend per configured cluster (the first one is the default).

    Use ``async with Storage(settings) as storage`` or ``await storage.start()`` / ``close()``;
    FILE paths work before `start`, S3 paths need it (clients are created once, there).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # whole objects and the control plane (writer, lists, uploads): storage_timeout per attempt, any
        # number of them within the retries; tile and index reads: the short policy S3Backend derives
        bulk_deadline = settings.storage_timeout * (settings.storage_retries + 1)
        self._file = FileBackend(settings.file_inline_read_max, settings.file_handles, settings.file_handle_ttl,
                                 settings.file_threads, settings.storage_deadline, bulk_deadline)
        self._policy = RetryPolicy(settings.storage_retries, settings.storage_retry_backoff, settings.storage_timeout,
                                   float("inf"))
        names = [c.name.lower() for c in settings.s3_clusters]
        if len(set(names)) != len(names):
            raise InvalidPathError(f"S3 clusters must have distinct host[:port]: {', '.join(names)}")
        self._s3: dict[str, S3Backend] = {}
        self._default_s3: S3Backend | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        s = self.settings
        if s.s3_clusters:
            try:
                for cluster in s.s3_clusters:
                    backend = S3Backend(cluster, s, self._policy)
                    await backend.start()
                    self._s3[cluster.name.lower()] = backend
            except BaseException:
                await self.close()
                raise
            self._default_s3 = self._s3[s.s3_clusters[0].name.lower()]
        self._started = True

    async def close(self) -> None:
        await self._file.close()
        for backend in self._s3.values():
            await backend.close()
        self._s3.clear()
        self._default_s3 = None
        self._started = False

    async def __aenter__(self) -> Storage:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- dispatch -------------------------------------------------------------------------------

    def backend(self, path: StoragePath) -> Backend:
        if path.scheme is Scheme.FILE:
            return self._file
        backend = self._default_s3 if path.cluster is None else self._s3.get(path.cluster)
        if backend is None:
            if not self._started:
                raise StorageError(f"{path}: storage not started")
            if not self._s3:
                raise InvalidPathError(f"{path}: no S3 cluster configured (ROK4_S3_URL)")
            raise InvalidPathError(f"{path}: unknown S3 cluster {path.cluster!r} (known: {', '.join(self._s3)})")
        return backend

    # -- operations -------------------------------------------------------------------------------

    async def read(self, path: PathLike, offset: int | None = None, size: int | None = None) -> bytes | None:
        """Bytes ``[offset, offset + size)`` (short at the end), or None when absent. Links are not
        followed on object storage: see `read_resolving_links`."""
        if (offset is not None and offset < 0) or (size is not None and size < 0):
            raise ValueError(f"read {path}: negative offset or size")
        p = parse_path(path)
        return await self.backend(p).read(p, offset, size)

    async def read_all(self, path: PathLike) -> bytes | None:
        return await self.read(path)

    async def read_resolving_links(self, path: PathLike, offset: int | None = None,
                                   size: int | None = None) -> tuple[str, bytes | None]:
        """Read like `read`, following ROK4 ``SYMLINK#`` objects; returns (real path, bytes).

        Callers cache the real path and read further ranges (tiles) from it directly. A link target
        lives on the link's cluster; chains are followed up to ``max_link_depth`` links, and a loop
        or a longer chain raises LinkLoopError. On disk the kernel follows symlinks (ELOOP →
        LinkLoopError, dangling → None) and the path comes back as given.
        """
        if (offset is not None and offset < 0) or (size is not None and size < 0):
            raise ValueError(f"read {path}: negative offset or size")
        p = parse_path(path)
        backend = self.backend(p)
        data = await backend.read(p, offset, size)
        if not backend.object_links or data is None or not may_be_link(data, offset, size):
            return str(path), data
        first = p
        seen = {p}
        while True:
            head = data if not offset else await backend.read(p, 0, MAX_LINK_SIZE + 1)
            target = decode_link(head) if head else None
            if target is None:
                return (str(path) if p is first else str(p)), data
            following = StoragePath(Scheme.S3, target[1], target[0], p.cluster)
            if following in seen:
                raise LinkLoopError(f"{path}: link loop ({p} links back to {following})")
            if len(seen) > self.settings.max_link_depth:
                raise LinkLoopError(f"{path}: more than {self.settings.max_link_depth} chained links")
            seen.add(following)
            p = following
            data = await backend.read(p, offset, size)
            if data is None or not may_be_link(data, offset, size):
                return str(p), data

    async def write(self, path: PathLike, data: bytes) -> None:
        """Create or replace atomically (disk: temp file + rename, never through a symlink)."""
        p = parse_path(path)
        await self.backend(p).write(p, data)

    async def put_file(self, path: PathLike, local: str) -> None:
        """Store a local file at `path` without holding it in memory (disk: copy; S3: streamed PUT)."""
        p = parse_path(path)
        await self.backend(p).put_file(p, local)

    async def get_file(self, path: PathLike, local: str) -> bool:
        """Copy `path` into a local file, streamed; False when absent."""
        p = parse_path(path)
        return await self.backend(p).get_file(p, local)

    async def exists(self, path: PathLike) -> bool:
        p = parse_path(path)
        return await self.backend(p).exists(p)

    async def size(self, path: PathLike) -> int | None:
        p = parse_path(path)
        return await self.backend(p).size(p)

    async def delete(self, path: PathLike) -> None:
        p = parse_path(path)
        await self.backend(p).delete(p)

    async def link(self, target: PathLike, link_path: PathLike) -> None:
        """Make `link_path` a ROK4 link to `target`: relative symlink on disk, ``SYMLINK#`` object
        on S3. Both must be on the same storage (same scheme, same S3 cluster)."""
        t, p = parse_path(target), parse_path(link_path)
        backend = self.backend(p)
        if self.backend(t) is not backend:
            raise InvalidPathError(f"link {p} -> {t}: a link and its target must share a storage")
        await backend.link(t, p)

    async def list(self, prefix: PathLike) -> AsyncIterator[str]:
        """Paths of every object/file starting with `prefix`, spelled like `prefix`."""
        p = parse_path(prefix)
        async for item in self.backend(p).list(p):
            yield str(item)

    async def sizes(self, prefix: PathLike) -> AsyncIterator[tuple[str, int]]:
        """(path, bytes) of every object/file starting with `prefix`."""
        p = parse_path(prefix)
        async for item, size in self.backend(p).sizes(p):
            yield str(item), size
