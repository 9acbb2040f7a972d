"""ROK4 pyramid descriptors (`<root>/<name>.json`): a typed model, parsing with named errors, writing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from tileserver.numbers import integral_text
from tileserver.rok4.formats import MASK_FORMAT, PyramidFormat, get_format
from tileserver.rok4.naming import b36_path, object_key

STORAGE_TYPES = ("FILE", "S3", "CEPH", "SWIFT")
# key naming the container for each object storage type
CONTAINER_KEYS = {"S3": "bucket_name", "CEPH": "pool_name", "SWIFT": "container_name"}
INTERPOLATIONS = ("nn", "linear", "bicubic", "lanczos")
PHOTOMETRICS = ("gray", "rgb", "mask")


class DescriptorError(ValueError):
    """A descriptor that cannot be used; the message names the field."""


@dataclass(frozen=True)
class TileLimits:
    min_col: int
    max_col: int
    min_row: int
    max_row: int

    def contains(self, col: int, row: int) -> bool:
        return self.min_col <= col <= self.max_col and self.min_row <= row <= self.max_row

    def union(self, other: TileLimits) -> TileLimits:
        return TileLimits(
            min(self.min_col, other.min_col),
            max(self.max_col, other.max_col),
            min(self.min_row, other.min_row),
            max(self.max_row, other.max_row),
        )

    def to_dict(self) -> dict[str, int]:
        return {"min_row": self.min_row, "max_row": self.max_row, "min_col": self.min_col, "max_col": self.max_col}


@dataclass(frozen=True)
class LevelStorage:
    type: str
    # FILE
    image_directory: str = ""
    mask_directory: str = ""
    path_depth: int = 2
    # object storage (S3, CEPH, SWIFT)
    container: str = ""
    image_prefix: str = ""
    mask_prefix: str = ""

    def slab_name(self, slab_col: int, slab_row: int, mask: bool = False) -> str:
        """Path relative to the descriptor's directory (FILE) or key inside the container (objects)."""
        if self.type == "FILE":
            directory = self.mask_directory if mask else self.image_directory
            return f"{directory.rstrip('/')}/{b36_path(slab_col, slab_row, self.path_depth)}"
        return object_key(self.mask_prefix if mask else self.image_prefix, slab_col, slab_row)

    def to_dict(self) -> dict[str, Any]:
        if self.type == "FILE":
            out: dict[str, Any] = {"type": "FILE", "image_directory": self.image_directory, "path_depth": self.path_depth}
            if self.mask_directory:
                out["mask_directory"] = self.mask_directory
            return out
        out = {"type": self.type, "image_prefix": self.image_prefix, CONTAINER_KEYS[self.type]: self.container}
        if self.mask_prefix:
            out["mask_prefix"] = self.mask_prefix
        return out


@dataclass(frozen=True)
class Level:
    id: str
    tiles_per_width: int
    tiles_per_height: int
    tile_limits: TileLimits
    storage: LevelStorage
    tables: tuple[dict[str, Any], ...] | None = None  # vector pyramids only

    @property
    def tiles_per_slab(self) -> int:
        return self.tiles_per_width * self.tiles_per_height

    def slab_of(self, col: int, row: int) -> tuple[int, int, int]:
        """(slab col, slab row, index of the tile in the slab)."""
        tpw, tph = self.tiles_per_width, self.tiles_per_height
        return col // tpw, row // tph, (row % tph) * tpw + (col % tpw)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "tiles_per_width": self.tiles_per_width,
            "tiles_per_height": self.tiles_per_height,
            "tile_limits": self.tile_limits.to_dict(),
            "storage": self.storage.to_dict(),
        }
        if self.tables is not None:
            out["tables"] = list(self.tables)
        return out


@dataclass(frozen=True)
class RasterSpecifications:
    channels: int
    nodata: tuple[float, ...]
    photometric: str
    interpolation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "nodata": ",".join(integral_text(v) for v in self.nodata),
            "photometric": self.photometric,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class Descriptor:
    tile_matrix_set: str
    format: PyramidFormat
    levels: tuple[Level, ...]
    raster: RasterSpecifications | None = None
    mask_format: str | None = None
    _by_id: dict[str, Level] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({lv.id: lv for lv in self.levels})

    def level(self, level_id: str) -> Level | None:
        return self._by_id.get(str(level_id))

    @property
    def level_ids(self) -> list[str]:
        return [lv.id for lv in self.levels]

    @property
    def channels(self) -> int:
        return self.raster.channels if self.raster else 0

    @property
    def nodata(self) -> tuple[float, ...]:
        return self.raster.nodata if self.raster else ()

    @property
    def storage_type(self) -> str:
        return self.levels[0].storage.type

    def with_levels(self, levels: list[Level]) -> Descriptor:
        return replace(self, levels=tuple(levels), _by_id={})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tile_matrix_set": self.tile_matrix_set,
            "format": self.format.code,
        }
        if self.raster is not None:
            out["raster_specifications"] = self.raster.to_dict()
        if self.mask_format:
            out["mask_format"] = self.mask_format
        out["levels"] = [lv.to_dict() for lv in self.levels]
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def _get(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    if key not in data:
        if required:
            raise DescriptorError(f"{where}: missing field {key!r}")
        return None
    value = data[key]
    if isinstance(value, bool) and kinds is not bool or not isinstance(value, kinds):
        raise DescriptorError(f"{where}: field {key!r} has a wrong type ({type(value).__name__})")
    return value


def _parse_storage(data: Any, where: str) -> LevelStorage:
    if not isinstance(data, dict):
        raise DescriptorError(f"{where}: field 'storage' must be an object")
    kind = _get(data, "type", str, f"{where}.storage")
    at = f"{where}.storage"
    if kind not in STORAGE_TYPES:
        raise DescriptorError(f"{at}: field 'type' must be one of {', '.join(STORAGE_TYPES)} (got {kind!r})")
    if kind == "FILE":
        depth = _get(data, "path_depth", int, at, required=False)
        if depth is not None and depth < 0:
            raise DescriptorError(f"{at}: field 'path_depth' must not be negative")
        return LevelStorage(
            type="FILE",
            image_directory=_get(data, "image_directory", str, at),
            mask_directory=_get(data, "mask_directory", str, at, required=False) or "",
            path_depth=2 if depth is None else depth,
        )
    return LevelStorage(
        type=kind,
        container=_get(data, CONTAINER_KEYS[kind], str, at),
        image_prefix=_get(data, "image_prefix", str, at),
        mask_prefix=_get(data, "mask_prefix", str, at, required=False) or "",
    )


def _parse_level(data: Any, index: int, vector: bool) -> Level:
    where = f"levels[{index}]"
    if not isinstance(data, dict):
        raise DescriptorError(f"{where} must be an object")
    level_id = _get(data, "id", (str, int), where)
    level_id = str(level_id)
    if not level_id or "_" in level_id:
        raise DescriptorError(f"{where}: field 'id' must be a non-empty string without '_'")
    tpw = _get(data, "tiles_per_width", int, where)
    tph = _get(data, "tiles_per_height", int, where)
    if tpw <= 0 or tph <= 0:
        raise DescriptorError(f"{where}: tiles_per_width and tiles_per_height must be positive")
    raw_limits = _get(data, "tile_limits", dict, where)
    limits = {}
    for key in ("min_col", "max_col", "min_row", "max_row"):
        limits[key] = _get(raw_limits, key, int, f"{where}.tile_limits")
    if limits["min_col"] > limits["max_col"] or limits["min_row"] > limits["max_row"]:
        raise DescriptorError(f"{where}.tile_limits: min above max")
    tables = data.get("tables", [])
    if vector and not isinstance(tables, list):
        raise DescriptorError(f"{where}: field 'tables' must be an array")
    return Level(
        id=level_id,
        tiles_per_width=tpw,
        tiles_per_height=tph,
        tile_limits=TileLimits(**limits),
        storage=_parse_storage(data.get("storage"), where),
        tables=tuple(tables) if vector else None,
    )


def _parse_nodata(value: Any, channels: int, where: str) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        parts = [float(value)]
    elif isinstance(value, str):
        try:
            parts = [float(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise DescriptorError(f"{where}: field 'nodata' must be comma-separated numbers ({value!r})") from None
    elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        parts = [float(v) for v in value]
    else:
        raise DescriptorError(f"{where}: field 'nodata' must be a string of comma-separated numbers")
    # ROK4's server reads missing values as 255
    parts = parts[:channels] + [255.0] * (channels - len(parts))
    return tuple(parts)


def parse_descriptor(data: bytes | str | dict[str, Any]) -> Descriptor:
    """Typed descriptor; raises DescriptorError naming the field on anything unusable."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise DescriptorError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DescriptorError("descriptor must be a JSON object")
    tms = _get(data, "tile_matrix_set", str, "descriptor")
    code = _get(data, "format", str, "descriptor")
    try:
        fmt = get_format(code)
    except ValueError as exc:
        raise DescriptorError(f"descriptor: field 'format': {exc}") from None
    raster = None
    if not fmt.is_vector:
        spec = _get(data, "raster_specifications", dict, "descriptor")
        where = "raster_specifications"
        channels = _get(spec, "channels", int, where)
        if not 1 <= channels <= 4:
            raise DescriptorError(f"{where}: field 'channels' must be 1 to 4 (got {channels})")
        if fmt.compression in ("jpg", "jpg90") and channels != 3:
            raise DescriptorError(f"{where}: field 'channels' must be 3 for {fmt.code}")
        photometric = spec.get("photometric", "rgb" if channels >= 3 else "gray")
        if photometric not in PHOTOMETRICS:
            raise DescriptorError(f"{where}: field 'photometric' must be one of {', '.join(PHOTOMETRICS)}")
        interpolation = spec.get("interpolation", "bicubic")
        if interpolation not in INTERPOLATIONS:
            raise DescriptorError(f"{where}: field 'interpolation' must be one of {', '.join(INTERPOLATIONS)}")
        nodata = _parse_nodata(spec.get("nodata", ""), channels, where)
        raster = RasterSpecifications(channels, nodata, photometric, interpolation)
    mask_format = _get(data, "mask_format", str, "descriptor", required=False)
    if mask_format is not None and mask_format != MASK_FORMAT:
        raise DescriptorError(f"descriptor: field 'mask_format' must be {MASK_FORMAT}")
    raw_levels = _get(data, "levels", list, "descriptor")
    if not raw_levels:
        raise DescriptorError("descriptor: field 'levels' is empty")
    levels = [_parse_level(raw, i, fmt.is_vector) for i, raw in enumerate(raw_levels)]
    ids = [lv.id for lv in levels]
    if len(set(ids)) != len(ids):
        raise DescriptorError("descriptor: field 'levels' repeats a level id")
    if len({lv.storage.type for lv in levels}) > 1:
        raise DescriptorError("descriptor: field 'levels' mixes storage types")
    return Descriptor(tile_matrix_set=tms, format=fmt, levels=tuple(levels), raster=raster, mask_format=mask_format)


def check_against_tms(descriptor: Descriptor, tms: Any) -> None:
    """Every level must exist in the grid the descriptor names."""
    for i, level in enumerate(descriptor.levels):
        if level.id not in tms:
            raise DescriptorError(f"levels[{i}]: level {level.id!r} is not in tile matrix set {tms.id!r}")
