"""The interface every storage backend implements (one backend per scheme, or per S3 cluster)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from .paths import StoragePath


class Backend(ABC):
    """Async byte access to one storage. Absent objects are None/False, never exceptions.

    `object_links` tells the router whether ``SYMLINK#`` objects must be followed by hand (object
    storage) or whether links are transparent (filesystem symlinks, followed by the kernel).
    """

    object_links: bool = False

    async def start(self) -> None:
        """Open clients and pools; called once by the router."""
        return None

    async def close(self) -> None:
        """Release clients and pools."""
        return None

    @abstractmethod
    async def read(self, path: StoragePath, offset: int | None = None, size: int | None = None) -> bytes | None:
        """Bytes ``[offset, offset + size)``; fewer at the end of the object; None when absent.

        ``offset`` None means 0, ``size`` None means "to the end"; an offset past the end gives b"".
        """

    @abstractmethod
    async def write(self, path: StoragePath, data: bytes) -> None:
        """Create or replace the object atomically: readers see the old bytes or the new ones."""

    async def put_file(self, path: StoragePath, local: str) -> None:
        """Store a local file at `path` (backends stream it where they can)."""
        import asyncio
        from pathlib import Path

        await self.write(path, await asyncio.to_thread(Path(local).read_bytes))

    async def get_file(self, path: StoragePath, local: str) -> bool:
        """Copy `path` to a local file; False when absent."""
        import asyncio
        from pathlib import Path

        data = await self.read(path)
        if data is None:
            return False
        await asyncio.to_thread(Path(local).write_bytes, data)
        return True

    @abstractmethod
    async def exists(self, path: StoragePath) -> bool: ...

    @abstractmethod
    async def size(self, path: StoragePath) -> int | None:
        """Size in bytes, None when absent."""

    @abstractmethod
    async def delete(self, path: StoragePath) -> None:
        """Remove the object (a link itself, never its target); absent is fine."""

    @abstractmethod
    async def link(self, target: StoragePath, link: StoragePath) -> None:
        """Make `link` point to `target` the way ROK4 does on this storage."""

    @abstractmethod
    def list(self, prefix: StoragePath) -> AsyncIterator[StoragePath]:
        """Every object whose path starts with `prefix` (recursively), in lexicographic order."""

    async def sizes(self, prefix: StoragePath) -> AsyncIterator[tuple[StoragePath, int]]:
        """Every object under `prefix` with its size (what a quota measures); backends that list
        sizes for free override it."""
        async for path in self.list(prefix):
            size = await self.size(path)
            if size is not None:
                yield path, size
