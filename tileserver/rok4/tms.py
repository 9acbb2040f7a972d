"""Tile matrix sets in ROK4's JSON form (a subset of OGC TileMatrixSet 2.0).

The file name is the id descriptors use; the inner `id` may differ. Origin is top-left and rows go
down; `pointOfOrigin` is always easting first, whatever `orderedAxes` says.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

# OGC pixel size used to turn cell sizes into scale denominators (WMTS 1.0.0 §6.1)
OGC_PIXEL_SIZE = 0.00028
# Metres per degree on the WGS84 equatorial circumference, as the WMTS standard uses
METRES_PER_DEGREE = 6378137.0 * 2 * math.pi / 360


class TMSError(ValueError):
    """A tile matrix set that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class TileMatrix:
    id: str
    cell_size: float
    origin_x: float
    origin_y: float
    tile_width: int
    tile_height: int
    matrix_width: int
    matrix_height: int
    scale_denominator: float

    @property
    def tile_span_x(self) -> float:
        return self.tile_width * self.cell_size

    @property
    def tile_span_y(self) -> float:
        return self.tile_height * self.cell_size

    def tile_bbox(self, col: int, row: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of one tile, easting first."""
        xmin = self.origin_x + col * self.tile_span_x
        ymax = self.origin_y - row * self.tile_span_y
        return (xmin, ymax - self.tile_span_y, xmin + self.tile_span_x, ymax)

    def range_bbox(self, min_col: int, min_row: int, max_col: int, max_row: int) -> tuple[float, float, float, float]:
        """Extent of an inclusive tile range."""
        x0, _, _, y1 = self.tile_bbox(min_col, min_row)
        _, y0, x1, _ = self.tile_bbox(max_col, max_row)
        return (x0, y0, x1, y1)

    def point_to_tile(self, x: float, y: float) -> tuple[int, int]:
        """(col, row) of the tile containing a point (may be outside the matrix)."""
        return (
            math.floor((x - self.origin_x) / self.tile_span_x),
            math.floor((self.origin_y - y) / self.tile_span_y),
        )

    def point_to_pixel(self, x: float, y: float) -> tuple[int, int, int, int]:
        """(col, row, i, j): the tile and the pixel inside it."""
        px = math.floor((x - self.origin_x) / self.cell_size)
        py = math.floor((self.origin_y - y) / self.cell_size)
        return (px // self.tile_width, py // self.tile_height, px % self.tile_width, py % self.tile_height)

    def bbox_to_tile_range(
        self, bbox: tuple[float, float, float, float], clamp: bool = True
    ) -> tuple[int, int, int, int] | None:
        """Inclusive (min_col, min_row, max_col, max_row) of tiles touching a bbox; None if none.
        The tolerance is a fraction of a tile (a bbox edge on a tile edge stays out), not of a CRS
        unit: 1e-9 × a tile span in metres was 0.02 tile at PM level 1, enough to lose a tile."""
        xmin, ymin, xmax, ymax = bbox
        eps = 1e-9
        min_col = math.floor((xmin - self.origin_x) / self.tile_span_x + eps)
        max_col = math.ceil((xmax - self.origin_x) / self.tile_span_x - eps) - 1
        min_row = math.floor((self.origin_y - ymax) / self.tile_span_y + eps)
        max_row = math.ceil((self.origin_y - ymin) / self.tile_span_y - eps) - 1
        if clamp:
            min_col, min_row = max(min_col, 0), max(min_row, 0)
            max_col, max_row = min(max_col, self.matrix_width - 1), min(max_row, self.matrix_height - 1)
        if min_col > max_col or min_row > max_row:
            return None
        return (min_col, min_row, max_col, max_row)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return self.range_bbox(0, 0, self.matrix_width - 1, self.matrix_height - 1)

    def contains(self, col: int, row: int) -> bool:
        return 0 <= col < self.matrix_width and 0 <= row < self.matrix_height


@dataclass(frozen=True)
class TileMatrixSet:
    id: str  # the file name: what descriptors and URLs use
    crs: str
    ordered_axes: tuple[str, ...]
    matrices: tuple[TileMatrix, ...]
    inner_id: str = ""
    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    _by_id: dict[str, TileMatrix] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({m.id: m for m in self.matrices})

    def get(self, level: str) -> TileMatrix | None:
        return self._by_id.get(str(level))

    def __contains__(self, level: object) -> bool:
        return str(level) in self._by_id

    @cached_property
    def pyproj_crs(self) -> Any:
        import pyproj

        return pyproj.CRS.from_user_input(self.crs)

    @cached_property
    def is_geographic(self) -> bool:
        return bool(self.pyproj_crs.is_geographic)

    @cached_property
    def metres_per_unit(self) -> float:
        if self.is_geographic:
            return METRES_PER_DEGREE
        axis = self.pyproj_crs.axis_info[0] if self.pyproj_crs.axis_info else None
        return float(axis.unit_conversion_factor) if axis is not None else 1.0

    def scale_denominator(self, matrix: TileMatrix) -> float:
        """WMTS scale denominator recomputed from the cell size, as ROK4's capabilities do."""
        return matrix.cell_size * self.metres_per_unit / OGC_PIXEL_SIZE

    @cached_property
    def is_quadtree(self) -> bool:
        """Each level halves the one above, same origin and tile size (ROK4's test, ±0.01 %)."""
        ordered = sorted(self.matrices, key=lambda m: -m.cell_size)
        for upper, lower in zip(ordered, ordered[1:], strict=False):
            if abs(upper.cell_size / lower.cell_size - 2) > 2e-4:
                return False
            tolerance = 1e-4 * upper.cell_size
            if (
                abs(upper.origin_x - lower.origin_x) > tolerance
                or abs(upper.origin_y - lower.origin_y) > tolerance
                or upper.tile_width != lower.tile_width
                or upper.tile_height != lower.tile_height
            ):
                return False
        return True

    def level_for_resolution(
        self, resolution: float, levels: list[str] | None = None, finest: bool = False
    ) -> TileMatrix:
        """The matrix whose cell size is nearest `resolution` (log scale), among `levels` if given.

        With `finest`, prefer the coarsest level at least as fine as asked (no upsampling).
        """
        candidates = [self._by_id[lv] for lv in levels] if levels else list(self.matrices)
        if not candidates:
            raise TMSError(f"{self.id}: no level to choose from")
        if finest:
            fine_enough = [m for m in candidates if m.cell_size <= resolution * (1 + 1e-9)]
            if fine_enough:
                return max(fine_enough, key=lambda m: m.cell_size)
            return min(candidates, key=lambda m: m.cell_size)
        return min(candidates, key=lambda m: abs(math.log(m.cell_size / resolution)))

    def to_ogc_dict(self) -> dict[str, Any]:
        """OGC Two Dimensional Tile Matrix Set 2.0 JSON."""
        axes = list(self.ordered_axes)
        lat_first = bool(axes) and axes[0].lower() in ("lat", "y_lat", "latitude", "n", "north")
        doc: dict[str, Any] = {
            "id": self.id,
            "title": self.title or self.id,
            "crs": crs_uri(self.crs),
            "orderedAxes": axes,
            "tileMatrices": [],
        }
        if self.description:
            doc["description"] = self.description
        for m in self.matrices:
            origin = [m.origin_y, m.origin_x] if lat_first else [m.origin_x, m.origin_y]
            doc["tileMatrices"].append(
                {
                    "id": m.id,
                    "scaleDenominator": self.scale_denominator(m),
                    "cellSize": m.cell_size,
                    "cornerOfOrigin": "topLeft",
                    "pointOfOrigin": origin,
                    "tileWidth": m.tile_width,
                    "tileHeight": m.tile_height,
                    "matrixWidth": m.matrix_width,
                    "matrixHeight": m.matrix_height,
                }
            )
        return doc

    def to_morecantile(self) -> Any:
        import morecantile

        doc = self.to_ogc_dict()
        doc["id"] = "".join(c if c.isalnum() or c in "_-" else "_" for c in self.id)
        doc["crs"] = self.crs
        return morecantile.TileMatrixSet.model_validate(doc)


def crs_uri(code: str) -> str:
    """`EPSG:3857` → the OGC URI; other authorities keep their code in the URI path."""
    if ":" not in code or code.startswith("http"):
        return code
    authority, value = code.split(":", 1)
    if authority.upper() == "CRS" and value == "84":
        return "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
    return f"http://www.opengis.net/def/crs/{authority.upper()}/0/{value}"


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise TMSError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TMSError(f"{where}: field {key!r} has a wrong type ({type(value).__name__})")
    return value


def parse_tms(data: dict[str, Any], tms_id: str, source: str = "") -> TileMatrixSet:
    """Typed grid from the JSON document; every problem names `source` and the field."""
    where = source or tms_id
    if not isinstance(data, dict):
        raise TMSError(f"{where}: not a JSON object")
    crs = _field(data, "crs", str, where)
    axes = data.get("orderedAxes", ["X", "Y"])
    if not isinstance(axes, list) or len(axes) != 2:
        raise TMSError(f"{where}: field 'orderedAxes' must list two axes")
    raw_matrices = _field(data, "tileMatrices", list, where)
    if not raw_matrices:
        raise TMSError(f"{where}: field 'tileMatrices' is empty")
    matrices = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_matrices):
        at = f"{where}: tileMatrices[{i}]"
        if not isinstance(raw, dict):
            raise TMSError(f"{at} is not an object")
        tm_id = str(_field(raw, "id", (str, int), at))
        if "_" in tm_id:
            raise TMSError(f"{at}: field 'id' must not contain '_' ({tm_id!r})")
        if tm_id in seen:
            raise TMSError(f"{at}: field 'id' {tm_id!r} is repeated")
        seen.add(tm_id)
        origin = _field(raw, "pointOfOrigin", list, at)
        if len(origin) != 2 or not all(isinstance(v, int | float) for v in origin):
            raise TMSError(f"{at}: field 'pointOfOrigin' must be two numbers")
        cell = float(_field(raw, "cellSize", (int, float), at))
        if cell <= 0:
            raise TMSError(f"{at}: field 'cellSize' must be positive")
        ints = {}
        for key in ("tileWidth", "tileHeight", "matrixWidth", "matrixHeight"):
            value = _field(raw, key, int, at)
            if value <= 0:
                raise TMSError(f"{at}: field {key!r} must be positive")
            ints[key] = value
        scale = raw.get("scaleDenominator", 0.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise TMSError(f"{at}: field 'scaleDenominator' must be a number")
        matrices.append(
            TileMatrix(
                id=tm_id,
                cell_size=cell,
                origin_x=float(origin[0]),
                origin_y=float(origin[1]),
                tile_width=ints["tileWidth"],
                tile_height=ints["tileHeight"],
                matrix_width=ints["matrixWidth"],
                matrix_height=ints["matrixHeight"],
                scale_denominator=float(scale),
            )
        )
    keywords = data.get("keywords", [])
    return TileMatrixSet(
        id=tms_id,
        crs=crs,
        ordered_axes=tuple(str(a) for a in axes),
        matrices=tuple(matrices),
        inner_id=str(data.get("id", tms_id)),
        title=str(data.get("title", "")),
        description=str(data.get("description", "")),
        keywords=tuple(str(k) for k in keywords) if isinstance(keywords, list) else (),
    )


def load_tms_file(path: str | Path) -> TileMatrixSet:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TMSError(f"{path}: no such tile matrix set file") from None
    except (OSError, ValueError) as exc:
        raise TMSError(f"{path}: unreadable JSON ({exc})") from None
    return parse_tms(data, path.stem, str(path))


@lru_cache(maxsize=256)
def _load_cached(directory: str, tms_id: str, mtime: float) -> TileMatrixSet:
    return load_tms_file(Path(directory) / f"{tms_id}.json")


def load_tms(tms_id: str, directory: str | Path | None = None) -> TileMatrixSet:
    """Grid by id (file name) from `directory` (default: settings' / ROK4_TMS_DIRECTORY)."""
    if directory is None:
        from tileserver.settings import load_settings

        directory = load_settings().tms_directory
    if not tms_id or "/" in tms_id or "\\" in tms_id or tms_id.startswith("."):
        raise TMSError(f"{tms_id!r}: not a tile matrix set id")
    path = Path(directory) / f"{tms_id}.json"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        raise TMSError(f"{path}: no such tile matrix set file") from None
    return _load_cached(str(directory), tms_id, mtime)


def list_tms(directory: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.json"))
