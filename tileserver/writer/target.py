"""Where a pyramid's pieces go, with ROK4's conventional layout (the only one core-python reads).

| piece        | FILE (`ROOT` a directory)             | S3 (`ROOT` = `s3://bucket[/prefix]`)    |
|--------------|---------------------------------------|-----------------------------------------|
| descriptor   | `ROOT/NAME.json`                      | `s3://bucket/prefix/NAME.json`          |
| list         | `ROOT/NAME.list` (root `0=ROOT/NAME`) | same, root `0=bucket/prefix/NAME`       |
| data slab    | `ROOT/NAME/DATA/<lvl>/<b36>.tif`      | `…/prefix/NAME/DATA_<lvl>_<c>_<r>`      |
| mask slab    | `ROOT/NAME/MASK/<lvl>/<b36>.tif`      | `…/prefix/NAME/MASK_<lvl>_<c>_<r>`      |
| summary      | `ROOT/NAME/summary.json`              | `…/prefix/NAME/summary.json`            |
| journal      | `ROOT/NAME.list.partial[.K-N]`        | same                                    |
| work files   | `ROOT/NAME.work/<lvl>/<c>_<r>`        | same                                    |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tileserver.rok4.descriptor import LevelStorage
from tileserver.storage import Scheme, parse_path

from .errors import WriterError


@dataclass(frozen=True)
class PyramidTarget:
    root: str  # normalised: absolute directory, or s3://bucket[@cluster][/prefix] without trailing /
    name: str
    path_depth: int = 2

    @classmethod
    def make(cls, root: str, name: str, path_depth: int = 2) -> PyramidTarget:
        if not name or name.startswith(".") or any(c in name for c in "/\\ \t\n") or name.endswith(".json"):
            raise WriterError(f"--name {name!r}: a pyramid name is a plain file name (no '/', no spaces)")
        if not root:
            raise WriterError("--output is required")
        try:
            parsed = parse_path(root)
        except ValueError as exc:
            raise WriterError(f"--output {root!r}: {exc}") from None
        if parsed.scheme is Scheme.FILE:
            root = os.path.abspath(parsed.key).rstrip("/") or "/"
        else:
            root = str(parsed).rstrip("/")
        return cls(root, name, path_depth)

    @property
    def is_file(self) -> bool:
        return self.storage_type == "FILE"

    @property
    def storage_type(self) -> str:
        return "FILE" if parse_path(self.root).scheme is Scheme.FILE else "S3"

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    @property
    def descriptor_path(self) -> str:
        return self.path(f"{self.name}.json")

    @property
    def list_path(self) -> str:
        return self.path(f"{self.name}.list")

    @property
    def summary_path(self) -> str:
        return self.path(f"{self.name}/summary.json")

    def journal_path(self, shard: tuple[int, int] | None = None) -> str:
        suffix = f".{shard[0]}-{shard[1]}" if shard else ""
        return self.path(f"{self.name}.list.partial{suffix}")

    def work_path(self, level: str, col: int, row: int) -> str:
        return self.path(f"{self.name}.work/{level}/{col}_{row}")

    def work_prefix(self, level: str | None = None) -> str:
        return self.path(f"{self.name}.work/" + (f"{level}/" if level else ""))

    @property
    def _key_prefix(self) -> str:
        """Key prefix of the root inside its bucket ('' or 'prefix/')."""
        key = parse_path(self.root).key.strip("/")
        return f"{key}/" if key else ""

    def level_storage(self, level: str, mask: bool) -> LevelStorage:
        """The `storage` section ROK4 writes for a level of this pyramid."""
        if self.is_file:
            return LevelStorage(type="FILE", image_directory=f"{self.name}/DATA/{level}",
                                mask_directory=f"{self.name}/MASK/{level}" if mask else "",
                                path_depth=self.path_depth)
        prefix = f"{self._key_prefix}{self.name}"
        return LevelStorage(type="S3", container=parse_path(self.root).bucket,
                            image_prefix=f"{prefix}/DATA_{level}",
                            mask_prefix=f"{prefix}/MASK_{level}" if mask else "")

    def slab_path(self, level: str, col: int, row: int, mask: bool = False) -> str:
        """Full storage path of a slab (what Storage.write takes)."""
        name = self.level_storage(level, True).slab_name(col, row, mask)
        if self.is_file:
            return self.path(name)
        p = parse_path(self.root)
        container = p.bucket if p.cluster is None else f"{p.bucket}@{p.cluster}"
        return f"s3://{container}/{name}"

    def list_entry(self, level: str, col: int, row: int, mask: bool = False) -> str:
        """The slab's line in the `.list`, relative to root 0."""
        name = self.level_storage(level, True).slab_name(col, row, mask)
        if self.is_file:
            return name.removeprefix(f"{self.name}/")
        return name.removeprefix(f"{self._key_prefix}{self.name}/")

    @property
    def data_root(self) -> str:
        """Storage path the `.list` entries of root 0 are relative to."""
        if self.is_file:
            return self.path(self.name)
        p = parse_path(self.root)
        container = p.bucket if p.cluster is None else f"{p.bucket}@{p.cluster}"
        return f"s3://{container}/{self._key_prefix}{self.name}"

    @property
    def list_root(self) -> str:
        """Root 0 of the `.list`: the data directory, or `bucket/prefix/NAME` (no cluster)."""
        if self.is_file:
            return self.path(self.name)
        return f"{parse_path(self.root).bucket}/{self._key_prefix}{self.name}"
