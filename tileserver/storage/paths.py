"""Storage paths: ``/plain/path`` or ``file:///path`` (FILE) and ``s3://bucket[@host[:port]]/key`` (S3).

Parsed once into a `StoragePath` so backends never re-split strings on the hot path; formatting
gives back the same spelling (``file://`` kept, ``@cluster`` kept) so paths stay stable cache keys.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import lru_cache

from .errors import InvalidPathError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Scheme(StrEnum):
    FILE = "file"
    S3 = "s3"


@dataclass(frozen=True, slots=True)
class StoragePath:
    """One location. For FILE, `key` is the filesystem path; for S3 the object key in `bucket`.

    `cluster` is the ``host[:port]`` written after ``@`` (None: the default cluster); `uri` only
    remembers that a FILE path was spelled ``file://`` and takes no part in equality.
    """

    scheme: Scheme
    key: str
    bucket: str = ""
    cluster: str | None = None
    uri: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        if self.scheme is Scheme.FILE:
            return "file://" + self.key if self.uri else self.key
        container = self.bucket if self.cluster is None else f"{self.bucket}@{self.cluster}"
        return f"s3://{container}/{self.key}" if self.key else f"s3://{container}"

    def with_key(self, key: str) -> StoragePath:
        """Same scheme, bucket and cluster, another key (or filesystem path)."""
        return replace(self, key=key)

    def join(self, relative: str) -> StoragePath:
        """`relative` resolved against this path taken as a directory (``..`` folded lexically)."""
        if _SCHEME.match(relative):
            return parse_path(relative)
        if self.scheme is Scheme.FILE:
            return self.with_key(os.path.normpath(os.path.join(self.key, relative)))
        return self.with_key(posixpath.normpath(posixpath.join("/", self.key, relative)).lstrip("/"))

    @property
    def parent(self) -> StoragePath:
        if self.scheme is Scheme.FILE:
            return self.with_key(os.path.dirname(self.key))
        return self.with_key(posixpath.dirname(self.key.rstrip("/")))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))


@lru_cache(maxsize=16384)
def _parse(path: str) -> StoragePath:
    match = _SCHEME.match(path)
    if match is None:
        if not path:
            raise InvalidPathError("empty storage path")
        return StoragePath(Scheme.FILE, path)
    scheme = match.group(1).lower()
    rest = path[match.end() :]
    if scheme == "file":
        if not rest:
            raise InvalidPathError(f"{path!r}: no file path")
        return StoragePath(Scheme.FILE, rest, uri=True)
    if scheme == "s3":
        container, _, key = rest.partition("/")
        bucket, at, cluster = container.partition("@")
        if not bucket or (at and not cluster):
            raise InvalidPathError(f"{path!r}: expected s3://bucket[@host[:port]]/key")
        return StoragePath(Scheme.S3, key, bucket, cluster.lower() if at else None)
    raise InvalidPathError(f"{path!r}: unsupported storage scheme {scheme!r} (file or s3)")


def parse_path(path: str | StoragePath) -> StoragePath:
    """Split a path into scheme, bucket, cluster and key; raises InvalidPathError on bad syntax."""
    if isinstance(path, StoragePath):
        return path
    return _parse(path)


def join(base: str | StoragePath, relative: str) -> str:
    """`relative` resolved against the directory `base`, keeping scheme and cluster.

    An absolute URL in `relative` wins; an absolute FILE path wins on disk, and on S3 a leading
    ``/`` means "from the bucket root" (a key cannot climb out of its bucket).
    """
    return str(parse_path(base).join(relative))


def dirname(path: str | StoragePath) -> str:
    """The parent directory (FILE) or key prefix (S3), keeping scheme and cluster."""
    return str(parse_path(path).parent)


def basename(path: str | StoragePath) -> str:
    return parse_path(path).name


def is_within(path: str | StoragePath, roots: Iterable[str | StoragePath], default_cluster: str | None = None) -> bool:
    """True when `path` lies inside one of `roots` once ``..`` and (on disk) symlinks are resolved.

    The server uses it to refuse reads outside its configured storage. S3 paths compare bucket,
    cluster (None stands for `default_cluster`) and key prefix on ``/`` boundaries.
    """
    target = parse_path(path)
    for root in map(parse_path, roots):
        if root.scheme is not target.scheme:
            continue
        if target.scheme is Scheme.FILE:
            real, real_root = os.path.realpath(target.key), os.path.realpath(root.key)
            if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
                return True
            continue
        if target.bucket != root.bucket:
            continue
        if (target.cluster or default_cluster) != (root.cluster or default_cluster):
            continue
        key = posixpath.normpath("/" + target.key)
        root_key = posixpath.normpath("/" + root.key).rstrip("/")
        if key == root_key or key.startswith(root_key + "/"):
            return True
    return False
