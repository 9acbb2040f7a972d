"""ROK4 styles: parse the style JSON files, apply a style to a raster, draw a legend ramp.

A style file (`<id>.json`, ROK4's `style.schema.json`) carries metadata (identifier — the STYLES
value —, title, abstract, keywords, legend) and at most one *computation* followed by an optional
palette, with ROK4's exclusions: `estompage` (hillshade), `pente` (slope) or `exposition` (aspect),
each optionally followed by `palette`; `palette` alone; `terrainrgb` alone; `colorize` alone; none
(`normal`, the identity). Defaults are ROK4's (core-cpp `style/*.h`).

Where we knowingly differ from ROK4 (its behaviour is a defect, not a format):

* hillshade: ROK4 reads `zenith` from the key `no_alpha` and lights from the azimuth minus 90°;
  we read `zenith` (ROK4's meaning: the sun's *elevation* above the horizon, it computes the zenith
  angle as ``90 - zenith``) and light from `azimuth` (clockwise from north), as GDAL/ESRI do;
* aspect: `min_slope` is compared with the slope angle (ROK4 compares radians with a tangent) and
  x and y resolutions are used separately (ROK4 uses their mean);
* palette: values below the first stop take the first colour (ROK4 extrapolates and wraps),
  colours are rounded (ROK4 truncates); terrainrgb rounds to the nearest step (ROK4 truncates).

Gradients (slope, aspect, hillshade) use Horn's 3x3 weighted differences (`algo: H`, the default)
or Zevenbergen-Thorne central differences (`algo: Z`), with x east and y north, in the data's unit
per metre (the caller gives resolutions in metres). Neighbourhood styles need the input with a
1-pixel border on every side; a pixel with nodata anywhere in its 3x3 window is nodata.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    from . import _pixels
except ImportError:  # built without a C compiler: numpy does it band by band
    _pixels = None  # type: ignore[assignment]


class StyleError(ValueError):
    """A style file that is not a valid ROK4 style; the message names the file and the field."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Legend:
    format: str
    url: str
    width: int
    height: int
    min_scale_denominator: float | None = None
    max_scale_denominator: float | None = None


@dataclass(frozen=True)
class Colour:
    value: float
    red: int
    green: int
    blue: int
    alpha: int


@dataclass(frozen=True)
class Palette:
    colours: tuple[Colour, ...]  # sorted by value, values unique
    rgb_continuous: bool = False
    alpha_continuous: bool = False
    no_alpha: bool = False

    @property
    def channels(self) -> int:
        return 3 if self.no_alpha else 4


@dataclass(frozen=True)
class Estompage:
    """Hillshade. `zenith` is the sun's elevation above the horizon (ROK4's meaning), degrees."""

    zenith: float = 45.0
    azimuth: float = 315.0
    z_factor: float = 1.0
    image_nodata: float = -99999.0
    estompage_nodata: float = 0.0
    interpolation: str | None = None


@dataclass(frozen=True)
class Pente:
    """Slope. `unit` is normalised to "degree" or "percent" (ROK4 spells it "pourcent")."""

    algo: str = "H"
    unit: str = "degree"
    image_nodata: float = -99999.0
    slope_nodata: float = 0.0
    slope_max: float = 90.0
    interpolation: str | None = None


@dataclass(frozen=True)
class Exposition:
    """Aspect, degrees clockwise from north, the direction the slope faces."""

    algo: str = "H"
    min_slope: float = 1.0  # degrees; flatter pixels get aspect_nodata
    image_nodata: float = -99999.0
    aspect_nodata: float = -1.0


@dataclass(frozen=True)
class Terrainrgb:
    """Mapbox Terrain-RGB: height = min_elevation + (R*65536 + G*256 + B) * step."""

    min_elevation: float = -10000.0
    step: float = 0.1


@dataclass(frozen=True)
class Colorize:
    """Replace one colour (within `tolerance` per channel) by another, e.g. white -> transparent."""

    source: tuple[int, ...] = (255, 255, 255)
    destination: tuple[int, ...] = (255, 255, 255, 0)
    tolerance: float = 0.0


@dataclass(frozen=True)
class Style:
    id: str  # file name without .json: what layer descriptors list
    identifier: str  # the WMS/WMTS STYLE value
    title: str
    abstract: str = ""
    keywords: tuple[str, ...] = ()
    legend: Legend | None = None
    palette: Palette | None = None
    estompage: Estompage | None = None
    pente: Pente | None = None
    exposition: Exposition | None = None
    terrainrgb: Terrainrgb | None = None
    colorize: Colorize | None = None
    source: str = field(default="", compare=False)  # where it was read from, for messages

    @property
    def is_identity(self) -> bool:
        return not (self.palette or self.estompage or self.pente or self.exposition
                    or self.terrainrgb or self.colorize)

    @property
    def border(self) -> int:
        """Pixels of neighbourhood needed on every side of the input (1 for 3x3 computations)."""
        return 1 if (self.estompage or self.pente or self.exposition) else 0

    def output_channels(self, input_channels: int) -> int:
        """Bands of the styled image for input data with `input_channels` bands."""
        if self.border:
            return self.palette.channels if self.palette else 1
        if self.palette and input_channels == 1:
            return self.palette.channels
        if self.terrainrgb and input_channels == 1:
            return 3
        if self.colorize and input_channels in (3, 4):
            return len(self.colorize.destination)
        return input_channels

    def bands_read(self, input_channels: int) -> int:
        """Leading bands of the data this style reads (`colorize` of RGBA into RGB never reads alpha):
        the renderer resamples only those; which pixels are nodata is still decided on every band."""
        if self.colorize and input_channels in (3, 4) and not self.border:
            compared = min(len(self.colorize.source), input_channels)
            copied = min(input_channels, len(self.colorize.destination))
            return max(3, compared, copied)  # 3 or more: apply_style's colorize takes 3- or 4-band data
        return input_channels

    def output_dtype(self, input_dtype: np.dtype | type, input_channels: int = 1) -> np.dtype:
        """Sample type of the styled image, so the caller can check the output format first."""
        if self.border:
            return np.dtype(np.uint8 if (self.palette or self.estompage) else np.float32)
        if self.output_channels(input_channels) != input_channels or (self.palette and input_channels == 1):
            return np.dtype(np.uint8)
        return np.dtype(input_dtype)

    def output_nodata(self, input_nodata: tuple[float, ...] | None = None) -> tuple[float, ...] | None:
        """Nodata of the styled image (ROK4: first palette colour, else the computation's nodata)."""
        if self.palette:
            c = self.palette.colours[0]
            return (c.red, c.green, c.blue) if self.palette.no_alpha else (c.red, c.green, c.blue, c.alpha)
        if self.estompage:
            return (self.estompage.estompage_nodata,)
        if self.pente:
            return (self.pente.slope_nodata,)
        if self.exposition:
            return (self.exposition.aspect_nodata,)
        if self.terrainrgb:
            return (0.0, 0.0, 0.0)
        if self.colorize:
            return tuple(float(v) for v in self.colorize.destination)
        return input_nodata


# --------------------------------------------------------------------------- parsing

_Spec = dict[str, tuple[type | tuple[type, ...], bool]]  # key -> (accepted JSON types, required)
_NUM = (int, float)

_TOP: _Spec = {
    "identifier": (str, True), "title": (str, True), "abstract": (str, False),
    "keywords": (list, False), "legend": (dict, False), "palette": (dict, False),
    "estompage": (dict, False), "pente": (dict, False), "exposition": (dict, False),
    "terrainrgb": (dict, False), "colorize": (dict, False),
}
_LEGEND: _Spec = {
    "format": (str, True), "url": (str, True), "width": (int, True), "height": (int, True),
    "min_scale_denominator": (_NUM, False), "max_scale_denominator": (_NUM, False),
}
_PALETTE: _Spec = {
    "rgb_continuous": (bool, False), "alpha_continuous": (bool, False), "no_alpha": (bool, False),
    "colours": (list, True),
}
_COLOUR: _Spec = {"value": (_NUM, True), "red": (int, True), "green": (int, True), "blue": (int, True),
                  "alpha": (int, True)}
_ESTOMPAGE: _Spec = {"zenith": (_NUM, False), "azimuth": (_NUM, False), "z_factor": (_NUM, False),
                     "image_nodata": (_NUM, False), "estompage_nodata": (_NUM, False),
                     "interpolation": (str, False)}
_PENTE: _Spec = {"algo": (str, False), "unit": (str, False), "image_nodata": (_NUM, False),
                 "slope_nodata": (_NUM, False), "slope_max": (_NUM, False), "interpolation": (str, False)}
_EXPOSITION: _Spec = {"algo": (str, False), "min_slope": (_NUM, False), "image_nodata": (_NUM, False),
                      "aspect_nodata": (_NUM, False)}
_TERRAINRGB: _Spec = {"min_elevation": (_NUM, False), "step": (_NUM, False)}
_COLORIZE: _Spec = {"source": (list, False), "destination": (list, False), "tolerance": (_NUM, False)}

_ALGOS = {"H", "Z"}
_UNITS = {"degree": "degree", "degrees": "degree", "pourcent": "percent", "percent": "percent"}


class _Parser:
    """Validates one document; every error names the file and the dotted path of the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> StyleError:
        return StyleError(f"{self.source}: {path}: {message}")

    def object(self, doc: Any, spec: _Spec, path: str) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(path or "(root)", "must be a JSON object")
        for key, value in doc.items():
            where = f"{path}.{key}" if path else key
            if key.startswith("$"):  # "$schema", "$comment"
                continue
            if key not in spec:
                raise self.fail(where, f"unknown field (expected one of {', '.join(sorted(spec))})")
            types = spec[key][0]
            # bool is an int in Python: only accept it where a boolean is expected
            if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
                raise self.fail(where, f"must be {_type_name(types)}, got {json.dumps(value)[:60]}")
        for key, (_, required) in spec.items():
            if required and key not in doc:
                raise self.fail(f"{path}.{key}" if path else key, "is required")
        return {k: v for k, v in doc.items() if not k.startswith("$")}

    def style(self, doc: Any, style_id: str) -> Style:
        top = self.object(doc, _TOP, "")
        if not top["identifier"].strip():
            raise self.fail("identifier", "must not be empty")
        keywords = top.get("keywords", [])
        for i, kw in enumerate(keywords):
            if not isinstance(kw, str):
                raise self.fail(f"keywords[{i}]", "must be a string")
        kinds = {k: top[k] for k in ("estompage", "pente", "exposition", "terrainrgb", "colorize") if k in top}
        self.check_combination(kinds, "palette" in top)
        return Style(
            id=style_id,
            identifier=top["identifier"],
            title=top["title"],
            abstract=top.get("abstract", ""),
            keywords=tuple(keywords),
            legend=self.legend(top["legend"]) if "legend" in top else None,
            palette=self.palette(top["palette"]) if "palette" in top else None,
            estompage=self.estompage(top["estompage"]) if "estompage" in top else None,
            pente=self.pente(top["pente"]) if "pente" in top else None,
            exposition=self.exposition(top["exposition"]) if "exposition" in top else None,
            terrainrgb=self.terrainrgb(top["terrainrgb"]) if "terrainrgb" in top else None,
            colorize=self.colorize(top["colorize"]) if "colorize" in top else None,
            source=self.source,
        )

    def check_combination(self, kinds: Collection[str], has_palette: bool) -> None:
        """ROK4's rules: one computation at most; terrainrgb and colorize exclude the palette."""
        if len(kinds) > 1:
            raise self.fail(sorted(kinds)[1], f"cannot be combined with {sorted(kinds)[0]}")
        for kind in ("terrainrgb", "colorize"):
            if kind in kinds and has_palette:
                raise self.fail(kind, "cannot be combined with palette")

    def legend(self, doc: Any) -> Legend:
        d = self.object(doc, _LEGEND, "legend")
        for key in ("width", "height"):
            if d[key] <= 0:
                raise self.fail(f"legend.{key}", "must be positive")
        return Legend(**d)

    def palette(self, doc: Any) -> Palette:
        d = self.object(doc, _PALETTE, "palette")
        if not d["colours"]:
            raise self.fail("palette.colours", "must not be empty")
        colours: dict[float, Colour] = {}
        for i, item in enumerate(d["colours"]):
            path = f"palette.colours[{i}]"
            c = self.object(item, _COLOUR, path)
            if not math.isfinite(c["value"]):
                raise self.fail(f"{path}.value", "must be finite")
            for band in ("red", "green", "blue", "alpha"):
                if not 0 <= c[band] <= 255:
                    raise self.fail(f"{path}.{band}", f"must be within 0..255, got {c[band]}")
            colours.setdefault(float(c["value"]), Colour(float(c["value"]), c["red"], c["green"], c["blue"],
                                                         c["alpha"]))  # ROK4 keeps the first duplicate
        return Palette(tuple(colours[v] for v in sorted(colours)), d.get("rgb_continuous", False),
                       d.get("alpha_continuous", False), d.get("no_alpha", False))

    def algo(self, value: str, path: str) -> str:
        if value not in _ALGOS:
            raise self.fail(path, f"must be one of {sorted(_ALGOS)}, got {value!r}")
        return value

    def estompage(self, doc: Any) -> Estompage:
        d = self.object(doc, _ESTOMPAGE, "estompage")
        if not 0 <= d.get("zenith", 45) <= 90:
            raise self.fail("estompage.zenith", "must be within 0..90 degrees")
        fields: dict[str, Any] = {k: float(v) if k != "interpolation" else v for k, v in d.items()}
        return Estompage(**fields)

    def pente(self, doc: Any) -> Pente:
        d = self.object(doc, _PENTE, "pente")
        if "algo" in d:
            d["algo"] = self.algo(d["algo"], "pente.algo")
        if "unit" in d:
            if d["unit"] not in _UNITS:
                raise self.fail("pente.unit", f"must be degree or pourcent/percent, got {d['unit']!r}")
            d["unit"] = _UNITS[d["unit"]]
        fields: dict[str, Any] = {k: float(v) if isinstance(v, int | float) else v for k, v in d.items()}
        return Pente(**fields)

    def exposition(self, doc: Any) -> Exposition:
        d = self.object(doc, _EXPOSITION, "exposition")
        if "algo" in d:
            d["algo"] = self.algo(d["algo"], "exposition.algo")
        fields: dict[str, Any] = {k: float(v) if isinstance(v, int | float) else v for k, v in d.items()}
        return Exposition(**fields)

    def terrainrgb(self, doc: Any) -> Terrainrgb:
        d = self.object(doc, _TERRAINRGB, "terrainrgb")
        if d.get("step", 1.0) <= 0:
            raise self.fail("terrainrgb.step", "must be positive")
        return Terrainrgb(**{k: float(v) for k, v in d.items()})

    def colorize(self, doc: Any) -> Colorize:
        d = self.object(doc, _COLORIZE, "colorize")
        out: dict[str, Any] = {}
        for key, sizes in (("source", (3, 4)), ("destination", (3, 4))):
            if key in d:
                values = d[key]
                if len(values) not in sizes or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       and 0 <= v <= 255 for v in values):
                    raise self.fail(f"colorize.{key}", "must be 3 or 4 integers within 0..255")
                out[key] = tuple(values)
        if "tolerance" in d:
            out["tolerance"] = float(d["tolerance"])
        return Colorize(**out)


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
             dict: "an object"}
    if types == _NUM:
        return "a number"
    if isinstance(types, tuple):
        return " or ".join(names[t] for t in types)
    return names[types]


def parse_style(doc: Any, style_id: str, source: str = "<style>") -> Style:
    """Style from an already decoded JSON document."""
    return _Parser(source).style(doc, style_id)


def load_style(path: str | Path) -> Style:
    """Read and validate one style file; its id is the file name without `.json`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise StyleError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise StyleError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return parse_style(doc, path.stem, str(path))


def load_styles_directory(path: str | Path) -> dict[str, Style]:
    """Every `*.json` style of a directory, keyed by id (file name); JSON schemas are skipped.

    One bad file fails the whole load (StyleError naming it): a half-loaded style book would
    silently change which styles layers offer."""
    styles: dict[str, Style] = {}
    for file in sorted(Path(path).glob("*.json")):
        if file.name.endswith(".schema.json"):
            continue
        style = load_style(file)
        styles[style.id] = style
    return styles


# --------------------------------------------------------------------------- computation


def _windows(data: np.ndarray) -> tuple[np.ndarray, ...]:
    """The nine shifted views a..i of a bordered (H+2, W+2) array (a = top-left, e = centre)."""
    h, w = data.shape[0] - 2, data.shape[1] - 2
    return tuple(data[r:r + h, c:c + w] for r in range(3) for c in range(3))


def gradient(data: np.ndarray, res_x: float, res_y: float, algo: str = "H") -> tuple[np.ndarray, np.ndarray]:
    """dz/dx (east) and dz/dy (north) of a bordered (H+2, W+2) array; output (H, W) float64.

    Horn: ((c + 2f + i) - (a + 2d + g)) / (8 res_x) and ((a + 2b + c) - (g + 2h + i)) / (8 res_y);
    Zevenbergen-Thorne: (f - d) / (2 res_x) and (b - h) / (2 res_y)."""
    a, b, c, d, _, f, g, h, i = (v.astype(np.float64, copy=False) for v in _windows(data))  # views of float64 data
    if algo == "Z":
        return (f - d) / (2 * res_x), (b - h) / (2 * res_y)
    return ((c + 2 * f + i) - (a + 2 * d + g)) / (8 * res_x), ((a + 2 * b + c) - (g + 2 * h + i)) / (8 * res_y)


def _window_invalid(data: np.ndarray, nodata_values: tuple[float | None, ...]) -> np.ndarray:
    """(H, W) pixels whose 3x3 window holds a NaN or one of the nodata values."""
    bad = np.isnan(data)
    for v in nodata_values:
        if v is not None and not math.isnan(v):
            bad |= data == v
    out = np.zeros((data.shape[0] - 2, data.shape[1] - 2), dtype=bool)
    for view in _windows(bad):
        out |= view
    return out


def hillshade(data: np.ndarray, res_x: float, res_y: float, p: Estompage) -> np.ndarray:
    """Illumination 0..255 of a bordered array: 255 x cos(angle between the surface normal and
    the sun), negative (self-shadowed) clamped to 0. float64 (H, W)."""
    dzdx, dzdy = gradient(data, res_x, res_y)
    dzdx *= p.z_factor
    dzdy *= p.z_factor
    alt, az = math.radians(p.zenith), math.radians(p.azimuth)
    # sun vector (east, north, up) dotted with the unnormalised normal (-dzdx, -dzdy, 1)
    lit = (math.sin(alt) - dzdx * math.sin(az) * math.cos(alt) - dzdy * math.cos(az) * math.cos(alt))
    lit /= np.sqrt(1.0 + dzdx * dzdx + dzdy * dzdy)
    return 255.0 * np.maximum(lit, 0.0)


def slope(data: np.ndarray, res_x: float, res_y: float, p: Pente) -> np.ndarray:
    """Slope in degrees or percent, capped at `slope_max`. float64 (H, W)."""
    dzdx, dzdy = gradient(data, res_x, res_y, p.algo)
    rise = np.hypot(dzdx, dzdy)
    value = np.degrees(np.arctan(rise)) if p.unit == "degree" else 100.0 * rise
    return np.minimum(value, p.slope_max)


def aspect(data: np.ndarray, res_x: float, res_y: float, p: Exposition) -> np.ndarray:
    """Direction the slope faces, degrees clockwise from north in [0, 360); `aspect_nodata` where
    the slope is under `min_slope` degrees (no meaningful direction). float64 (H, W)."""
    dzdx, dzdy = gradient(data, res_x, res_y, p.algo)
    # downhill direction is -grad; its compass bearing is atan2(east, north)
    value = np.degrees(np.arctan2(-dzdx, -dzdy)) % 360.0
    flat = np.degrees(np.arctan(np.hypot(dzdx, dzdy))) < p.min_slope
    return np.where(flat, p.aspect_nodata, value)


def palette_colours(palette: Palette, values: np.ndarray) -> np.ndarray:
    """uint8 (…, 3|4) colours of float values: linear between stops where continuous, else the
    stop at or below the value; below the first / above the last stop → first / last colour;
    NaN → first colour (ROK4's palette nodata)."""
    stops = np.array([c.value for c in palette.colours])
    table = np.array([[c.red, c.green, c.blue, c.alpha] for c in palette.colours], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    v = np.where(nan, stops[0], v)
    bands = 3 if palette.no_alpha else 4
    continuous = (palette.rgb_continuous,) * 3 + (palette.alpha_continuous,)
    idx = None
    if not all(continuous[:bands]):
        idx = np.clip(np.searchsorted(stops, v, side="right") - 1, 0, len(stops) - 1)
    # colours are within 0..255 and interpolation stays between two of them: no clip needed
    out = np.empty(v.shape + (bands,), dtype=np.uint8)
    for band in range(bands):
        plane = np.asarray(np.interp(v, stops, table[:, band]) if continuous[band] else table[idx, band])
        out[..., band] = np.rint(plane, out=plane) if continuous[band] else plane
    if nan.any():
        out[nan] = table[0, :bands]
    return out


def terrain_rgb(values: np.ndarray, p: Terrainrgb) -> np.ndarray:
    """Encode heights as Terrain-RGB uint8 (…, 3); below min_elevation, NaN → 0,0,0."""
    v = np.asarray(values, dtype=np.float64)
    code = np.rint((np.where(np.isnan(v), p.min_elevation, v) - p.min_elevation) / p.step)
    code = np.clip(code, 0, 256 ** 3 - 1).astype(np.uint32)
    return np.stack([(code >> 16) & 255, (code >> 8) & 255, code & 255], axis=-1).astype(np.uint8)


def colorize(data: np.ndarray, p: Colorize) -> np.ndarray:
    """Replace colours within `tolerance` (per band) of `source` by `destination`; output has
    len(destination) bands (a 3-band input gains an opaque alpha when destination has 4)."""
    data = np.asarray(data)
    if data.dtype == np.uint8:
        return _colorize_uint8(data, p)
    src = np.clip(np.asarray(data, dtype=np.float64), 0, 255)
    n = min(len(p.source), src.shape[-1])
    match = np.all(np.abs(src[..., :n] - np.asarray(p.source[:n], dtype=np.float64)) <= p.tolerance, axis=-1)
    out = np.full(src.shape[:-1] + (len(p.destination),), 255.0)
    bands = min(src.shape[-1], len(p.destination))
    out[..., :bands] = src[..., :bands]
    out[match] = p.destination
    return np.rint(out).astype(np.uint8)


def _colorize_uint8(data: np.ndarray, p: Colorize) -> np.ndarray:
    """`colorize` of uint8 samples in integers: the same pixels without float64 copies of the map
    (|v − source| ≤ tolerance ⇔ source − ⌊tolerance⌋ ≤ v ≤ source + ⌊tolerance⌋ for integers)."""
    n = min(len(p.source), data.shape[-1])
    tol = math.floor(p.tolerance)
    compiled = _compiled_colorize(data, p.source[:n], tol, p.destination)
    if compiled is not None:
        return compiled
    match = np.ones(data.shape[:-1], dtype=bool) if tol >= 0 else np.zeros(data.shape[:-1], dtype=bool)
    if tol >= 0:
        for band in range(n):
            low, high = p.source[band] - tol, p.source[band] + tol
            plane = data[..., band]
            if low > 0:
                match &= plane >= low
            if high < 255:
                match &= plane <= high
    out = np.empty(data.shape[:-1] + (len(p.destination),), dtype=np.uint8)
    bands = min(data.shape[-1], len(p.destination))
    for band, value in enumerate(p.destination):  # 2-D planes: numpy is slow along a last axis of 3-4
        plane = out[..., band]
        plane[...] = data[..., band] if band < bands else 255
        np.copyto(plane, np.uint8(value), where=match)
    return out


def _compiled_colorize(data: np.ndarray, source: Sequence[float], tolerance: int,
                       destination: Sequence[float]) -> np.ndarray | None:
    """`_colorize_uint8` in one compiled pass over the interleaved pixels (render/_pixels.c: ~1 ms
    a 1024² map against ~6 band by band), or None without the extension or for values it does not take."""
    if _pixels is None or data.shape[-1] > 4 or not 1 <= len(destination) <= 4:
        return None
    if not all(float(v).is_integer() and abs(v) < 2**30 for v in source):
        return None
    if not all(float(v).is_integer() and 0 <= v <= 255 for v in destination):
        return None
    pixels = np.ascontiguousarray(data)
    out = np.empty(data.shape[:-1] + (len(destination),), dtype=np.uint8)
    _pixels.colorize(pixels.reshape(-1), data.shape[-1], np.asarray(source, dtype=np.int32),
                     max(-1, min(tolerance, 1 << 30)), np.asarray(destination, dtype=np.uint8), out.reshape(-1),
                     out.size // len(destination))
    return out


@dataclass(frozen=True)
class _Computation:
    """A neighbourhood computation: its parameters' image_nodata and output nodata fields."""

    compute: Callable[[np.ndarray, float, float, Any], np.ndarray]
    params: Callable[[Style], Any]
    nodata: Callable[[Any], float]


_COMPUTATIONS: dict[str, _Computation] = {
    "estompage": _Computation(hillshade, lambda s: s.estompage, lambda p: p.estompage_nodata),
    "pente": _Computation(slope, lambda s: s.pente, lambda p: p.slope_nodata),
    "exposition": _Computation(aspect, lambda s: s.exposition, lambda p: p.aspect_nodata),
}


def _as_channels(data: np.ndarray) -> np.ndarray:
    return data[..., None] if data.ndim == 2 else data


def apply_style(style: Style, data: np.ndarray, nodata: float | tuple[float, ...] | None = None,
                res_x: float = 1.0, res_y: float = 1.0) -> np.ndarray:
    """Render `data` (H, W, C) — (H+2, W+2, 1) for neighbourhood styles (`style.border`) —
    through `style`. `nodata` is the data's nodata (one value or one per band); resolutions are
    in metres (the caller converts geographic ones). Returns (H, W, bands): uint8 for palettes,
    hillshade, terrainrgb and colorize; float32 for slope and aspect without palette; the input
    unchanged for the identity style. Palettes and terrainrgb only apply to 1-band data (others
    pass through unchanged, as in ROK4)."""
    data = _as_channels(np.asarray(data))
    nd = None if nodata is None else tuple(np.atleast_1d(np.asarray(nodata, dtype=np.float64)).tolist())
    kind = next((k for k in _COMPUTATIONS if getattr(style, k) is not None), None)
    if kind is not None:
        if data.shape[-1] != 1:
            raise ValueError(f"style {style.id!r} ({kind}) needs 1-band data, got {data.shape[-1]} bands")
        if data.shape[0] < 3 or data.shape[1] < 3:
            raise ValueError(f"style {style.id!r} needs a 1-pixel border around the data")
        comp = _COMPUTATIONS[kind]
        params = comp.params(style)
        plane = data[..., 0].astype(np.float64)
        invalid = _window_invalid(plane, (params.image_nodata, *(nd or ())))
        with np.errstate(invalid="ignore"):
            values = comp.compute(np.where(np.isnan(plane), 0.0, plane), res_x, res_y, params)
        values[invalid] = comp.nodata(params)
        if style.palette:
            return palette_colours(style.palette, values)
        if kind == "estompage":
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)[..., None]
        return values.astype(np.float32)[..., None]
    if data.shape[-1] == 1 and style.palette:
        values = data[..., 0].astype(np.float64)
        if nd is not None and not math.isnan(nd[0]):
            values = np.where(values == nd[0], np.nan, values)  # data nodata → palette nodata colour
        return palette_colours(style.palette, values)
    if data.shape[-1] == 1 and style.terrainrgb:
        values = data[..., 0].astype(np.float64)
        if nd is not None:
            values = np.where(values == nd[0], np.nan, values)
        return terrain_rgb(values, style.terrainrgb)
    if data.shape[-1] in (3, 4) and style.colorize:
        return colorize(data, style.colorize)
    return data


# --------------------------------------------------------------------------- legend


def legend_image(style: Style, width: int, height: int) -> bytes:
    """PNG ramp of a style, for a LegendURL: the palette's stops spread evenly (so a nodata stop at
    -99999 does not squash the rest), vertical when taller than wide; a grey ramp otherwise."""
    from PIL import Image

    if width <= 0 or height <= 0:
        raise ValueError("legend size must be positive")
    length = height if height > width else width
    t = np.linspace(0.0, 1.0, length)
    if style.palette:
        stops = np.array([c.value for c in style.palette.colours])
        positions = np.linspace(0.0, 1.0, len(stops)) if len(stops) > 1 else np.zeros(1)
        rgba = palette_colours(style.palette, np.interp(t, positions, stops))
        if rgba.shape[-1] == 3:
            rgba = np.concatenate([rgba, np.full(rgba.shape[:-1] + (1,), 255, np.uint8)], axis=-1)
    else:
        grey = np.rint(t * 255).astype(np.uint8)
        rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    if height > width:
        image = np.broadcast_to(rgba[::-1, None, :], (height, width, 4))  # high values on top
    else:
        image = np.broadcast_to(rgba[None, :, :], (height, width, 4))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGBA").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
