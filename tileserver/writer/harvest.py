"""`pyramid harvest`: a pyramid from a remote WMS (the processing "wms-to-pyramid").

Each slab of a harvested level is fetched as GetMap requests of at most `harvest_dimensions`
pixels (they must divide the slab), in the grid's CRS so no resampling happens here; levels not
harvested are computed from the level below as in a build. Timeouts, 5xx answers and XML
exceptions in place of an image are retried with exponential back-off, then the run stops with
an error naming the slab; what was finished is journaled, so rerunning resumes there.

A harvest run for an `/api` user (an execution) carries an outbound policy: its URL, each redirect
and each resolved address must be allowed, answers are capped in size, and its errors give the
status, content type and length of an answer, never its text (they end in the execution's logs).
The operator's CLI passes none and reaches any host, with the remote exception text in errors.
"""

from __future__ import annotations

import asyncio
import io
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from tileserver.outbound import OutboundError, OutboundPolicy, client_session, fetch
from tileserver.render.georef import get_crs, get_transformer
from tileserver.rok4.tms import TileMatrix
from tileserver.storage import Storage

from . import tasks
from .build import compute_upper_level, fingerprint, identity_options, load_grid
from .encode import EncodedSlab, SlabLayout
from .engine import PyramidWriter
from .errors import WriterError
from .options import BuildOptions
from .plan import BBox, polygon_slabs, select_levels, shard_share
from .progress import Progress
from .resample import convert_channels
from .target import PyramidTarget

_FORMATS = ("image/png", "image/jpeg", "image/tiff", "image/x-bil;bits=32")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DENSIFY = 16  # points per polygon edge when reprojecting the area


@dataclass(frozen=True)
class HarvestOptions:
    url: str
    layers: str
    format: str  # one of _FORMATS, optionally followed by "&format_options=…"
    area: tuple[np.ndarray, ...]  # polygons (outer rings), lon/lat, EPSG:4326
    levels: tuple[str, ...]
    dimensions: tuple[int, int] | None = None
    extras: str = ""
    threshold: int = 0
    style: str = ""
    timeout: float = 60.0
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry, doubled each time (capped at 60 s)
    area_wkt: str = field(default="", compare=False)
    outbound: OutboundPolicy | None = field(default=None, compare=False)  # None: the operator's run

    @classmethod
    def from_text(cls, *, url: str, layers: str, format: str, area: str, levels: str | Sequence[str],
                  dimensions: str | None = None, extras: str = "", threshold: int = 0, style: str = "",
                  **kw: Any) -> HarvestOptions:
        """From the processing's parameters as text; WriterError naming the parameter otherwise."""
        if not url.startswith(("http://", "https://")):
            raise WriterError(f"harvest_url {url!r}: expected an http(s) URL")
        if not layers.strip():
            raise WriterError("harvest_layers is empty")
        mime = format.split("&", 1)[0].strip().lower()
        if mime not in _FORMATS:
            raise WriterError(f"harvest_format {format!r}: expected one of {', '.join(_FORMATS)}")
        level_ids = tuple(v.strip() for v in (levels.split(",") if isinstance(levels, str) else levels) if v.strip())
        if not level_ids:
            raise WriterError("harvest_levels is empty")
        dims = None
        if dimensions:
            try:
                w, h = (int(v) for v in re.split(r"[,x ]+", dimensions.strip()))
            except ValueError:
                raise WriterError(f"harvest_dimensions {dimensions!r}: expected two integers W,H") from None
            if w <= 0 or h <= 0:
                raise WriterError("harvest_dimensions must be positive")
            dims = (w, h)
        if threshold < 0:
            raise WriterError("harvest_threshold must not be negative")
        return cls(url=url, layers=layers.strip(), format=format.strip(), area=parse_wkt_polygons(area),
                   levels=level_ids, dimensions=dims, extras=extras.strip().lstrip("&?"), threshold=threshold,
                   style=style, area_wkt=area, **kw)

    @property
    def mime(self) -> str:
        return self.format.split("&", 1)[0].strip().lower()

    @property
    def sample_format(self) -> str:
        return "FLOAT32" if "bil" in self.mime else "UINT8"


def parse_wkt_polygons(wkt: str) -> tuple[np.ndarray, ...]:
    """Outer rings of a WKT POLYGON or MULTIPOLYGON (holes are ignored: slabs in them are empty)."""
    text = wkt.strip()
    kind = text.split("(", 1)[0].strip().upper()
    if kind not in ("POLYGON", "MULTIPOLYGON"):
        raise WriterError(f"harvest_area: expected a WKT POLYGON or MULTIPOLYGON, got {text[:40]!r}")
    body = text[len(kind):].strip()
    polygons = re.findall(r"\(\s*\(([^()]*)\)", body) if kind == "MULTIPOLYGON" else re.findall(r"^\(\s*\(([^()]*)\)", body)
    rings = []
    for ring in polygons:
        try:
            points = np.array([[float(v) for v in p.split()[:2]] for p in ring.split(",") if p.strip()])
        except ValueError:
            raise WriterError(f"harvest_area: unreadable coordinates in {ring[:40]!r}") from None
        if len(points) < 3:
            raise WriterError("harvest_area: a polygon needs at least 3 points")
        if np.any(np.abs(points[:, 0]) > 180) or np.any(np.abs(points[:, 1]) > 90):
            raise WriterError("harvest_area: coordinates must be longitude, latitude in degrees (EPSG:4326)")
        rings.append(points)
    if not rings:
        raise WriterError(f"harvest_area: no polygon in {text[:60]!r}")
    return tuple(rings)


def area_in_grid(rings: Sequence[np.ndarray], crs: str) -> list[np.ndarray]:
    """The area's rings in the grid's CRS, edges densified (they bend once reprojected)."""
    transformer = get_transformer("EPSG:4326", crs)
    out = []
    for ring in rings:
        closed = np.vstack([ring, ring[:1]])
        t = np.linspace(0, 1, _DENSIFY, endpoint=False)
        pts = np.concatenate([a + t[:, None] * (b - a) for a, b in zip(closed[:-1], closed[1:], strict=True)])
        x, y = transformer.transform(pts[:, 0], pts[:, 1], errcheck=False)
        xy = np.column_stack([x, y])
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) >= 3:
            out.append(xy)
    return out


# --- decoding (worker side) ----------------------------------------------------------------------


def decode_image(data: bytes, mime: str, width: int, height: int) -> np.ndarray:
    """(h, w, c) pixels of a GetMap answer: float32 for BIL, uint8 otherwise."""
    if "bil" in mime:
        if len(data) != width * height * 4:
            raise ValueError(f"BIL image of {len(data)} bytes, expected {width * height * 4}")
        return np.frombuffer(data, dtype="<f4").reshape(height, width, 1).astype(np.float32)
    if "tiff" in mime:
        import tifffile

        pixels = tifffile.imread(io.BytesIO(data))
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as opened:
            image: Image.Image = opened  # or its conversion below
            if image.mode == "P":
                image = image.convert("RGBA")
            elif image.mode not in ("L", "LA", "RGB", "RGBA", "F", "I"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels, asked {width}x{height}")
    return pixels


@dataclass(frozen=True)
class HarvestTask:
    """Assemble the images fetched for one slab (positions in slab pixels)."""

    output: tasks.Output
    images: tuple[tuple[int, int, int, int, bytes], ...]  # x, y, width, height, payload
    mime: str

    def __call__(self) -> EncodedSlab | None:
        layout: SlabLayout = self.output.layout
        data, mask = layout.empty()
        nodata = np.asarray(layout.nodata, dtype=np.float32)
        for x, y, w, h, payload in self.images:
            raw = decode_image(payload, self.mime, w, h)
            alpha = raw.shape[2] in (2, 4) and raw.dtype == np.uint8
            valid = raw[..., -1] != 0 if alpha else np.ones((h, w), dtype=bool)
            pixels = convert_channels(raw.astype(np.float32), alpha, layout.channels)
            valid &= ~np.all(pixels == nodata, axis=2)
            if pixels.dtype.kind == "f":
                valid &= ~np.isnan(pixels).any(axis=2)
            data[y : y + h, x : x + w][valid] = pixels[valid].astype(layout.dtype)
            mask[y : y + h, x : x + w] = valid
        return self.output.encode((data, mask))


# --- fetching (main process) ---------------------------------------------------------------------


class WmsClient:
    """GetMap with retries; one aiohttp session for the run."""

    def __init__(self, options: HarvestOptions, crs: str) -> None:
        self.options = options
        self.crs = crs
        info = get_crs(crs).axis_info
        # WMS 1.3.0 orders BBOX as the CRS's axes: latitude first for EPSG:4326 and the like
        self.lat_first = bool(info) and info[0].direction.lower() in ("north", "south")
        self.session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> WmsClient:
        self.session = client_session(self.options.outbound, self.options.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self, bbox: BBox, width: int, height: int) -> str:
        o = self.options
        xmin, ymin, xmax, ymax = bbox
        box = (ymin, xmin, ymax, xmax) if self.lat_first else (xmin, ymin, xmax, ymax)
        mime, _, format_options = o.format.partition("&")
        params = {
            "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": o.layers, "STYLES": o.style,
            "CRS": self.crs, "BBOX": ",".join(repr(float(v)) for v in box), "WIDTH": str(width),
            "HEIGHT": str(height), "FORMAT": mime.strip(),
        }
        query = urllib.parse.urlencode(params, safe=",:;/=")
        if format_options:
            query += "&" + format_options
        if o.extras:
            query += "&" + o.extras
        return o.url + ("&" if "?" in o.url else "?") + query

    async def get_map(self, bbox: BBox, width: int, height: int) -> bytes:
        """The image bytes; WriterError after the retries are spent."""
        assert self.session is not None
        url = self.url(bbox, width, height)
        policy = self.options.outbound
        # for a user's run, no answer larger than the image as float32 RGBA plus room for headers
        max_bytes = width * height * 16 + (1 << 20) if policy is not None else None
        delay = self.options.backoff
        reason = ""
        for attempt in range(self.options.retries + 1):
            if attempt:
                await asyncio.sleep(min(delay, 60.0))
                delay *= 2
            self.requests += 1
            try:
                answer = await fetch(self.session, url, policy, max_redirects=10, max_bytes=max_bytes)
                if answer.status == 200 and not _is_exception(answer.media_type, answer.body):
                    return answer.body
                if policy is not None:
                    reason = answer.describe()  # the body of a user-named host never reaches the logs
                else:
                    reason = f"HTTP {answer.status}"
                    if _is_exception(answer.media_type, answer.body):
                        reason += f": {_exception_text(answer.body)}"
                if answer.status != 200 and answer.status not in _RETRY_STATUS:
                    break  # a client error (bad layer, bad CRS…) will not go away
            except OutboundError as exc:
                raise WriterError(f"harvest_url: {exc}") from None  # refused or too large: retrying cannot help
            except TimeoutError:
                reason = f"timed out after {self.options.timeout:g} s"
            except aiohttp.ClientError as exc:
                reason = f"{type(exc).__name__}: {exc}"
        raise WriterError(f"GetMap failed after {attempt + 1} attempt(s) ({reason}): {url}")


def _is_exception(content_type: str, body: bytes) -> bool:
    head = body[:200].lstrip().lower()
    return "xml" in content_type or "text/" in content_type or head.startswith((b"<?xml", b"<serviceexception"))


def _exception_text(body: bytes) -> str:
    text = re.sub(r"<[^>]+>", " ", body[:2000].decode(errors="replace"))
    return " ".join(text.split())[:200]


# --- the run -------------------------------------------------------------------------------------


def harvest_options_defaults(options: BuildOptions, harvest: HarvestOptions) -> BuildOptions:
    checked = options.checked()
    sample_format = checked.sampleformat or harvest.sample_format
    channels = checked.samplesperpixel or (1 if sample_format == "FLOAT32" else 3)
    return checked.resolved(channels, sample_format)


async def harvest_async(harvest: HarvestOptions, output: str, name: str, options: BuildOptions, storage: Storage, *,
                        tms_directory: str | None = None, shard: tuple[int, int] | None = None,
                        finish: int | None = None, wait: float = 0.0, overwrite: bool = False,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Harvest (or resume harvesting) a pyramid; returns its summary."""
    options = harvest_options_defaults(options, harvest)
    tms = load_grid(options.tms, tms_directory)
    for level in harvest.levels:
        if tms.get(level) is None:
            raise WriterError(f"harvest_levels: no level {level!r} in tile matrix set {tms.id}")
    lowest = min(harvest.levels, key=lambda lv: tms.get(lv).cell_size)  # type: ignore[union-attr]
    if options.bottom is not None and options.bottom != lowest:
        raise WriterError(f"--bottom {options.bottom} must be the lowest harvested level ({lowest})")
    matrices = select_levels(tms, lowest, options.top)
    if any(m.id not in {x.id for x in matrices} for m in map(tms.get, harvest.levels)):  # type: ignore[union-attr]
        raise WriterError("harvest_levels must lie between --bottom and --top")
    rings = area_in_grid(harvest.area, tms.crs)
    if not rings:
        raise WriterError("harvest_area cannot be expressed in the grid's CRS")
    footprints: list[BBox] = [(float(r[:, 0].min()), float(r[:, 1].min()), float(r[:, 0].max()), float(r[:, 1].max()))
                              for r in rings]
    plan = {m.id: set().union(*(polygon_slabs(m, r, options.width, options.height) for r in rings))
            for m in matrices if m.id in harvest.levels}
    if not plan[lowest]:
        raise WriterError(f"harvest_area lies outside the grid {tms.id}")
    layout = SlabLayout(options.width, options.height, matrices[0].tile_width, matrices[0].tile_height, 1, "UINT8",
                        "raw", (0,))
    if harvest.dimensions and (layout.width % harvest.dimensions[0] or layout.height % harvest.dimensions[1]):
        raise WriterError(f"harvest_dimensions {harvest.dimensions[0]}x{harvest.dimensions[1]} must divide the slab's "
                          f"{layout.width}x{layout.height} pixels")
    target = PyramidTarget.make(output, name, options.path_depth)
    fp = fingerprint(kind="harvest", url=harvest.url, layers=harvest.layers, format=harvest.format,
                     area=harvest.area_wkt, levels=sorted(harvest.levels), dimensions=harvest.dimensions,
                     extras=harvest.extras, threshold=harvest.threshold, style=harvest.style,
                     options=identity_options(options), levels_built=[m.id for m in matrices], root=target.root,
                     name=name)
    writer = PyramidWriter(storage, target, tms, matrices, options, fp, progress, shard, footprints)
    async with writer, WmsClient(harvest, tms.crs) as client:
        await writer.start(overwrite)
        bottom = matrices[0]
        if finish is not None:
            from .build import wait_for_shards

            await wait_for_shards(writer, finish, wait)
        else:
            share = shard_share(plan[bottom.id], *shard) if shard is not None else plan[bottom.id]
            await writer.run_level(bottom, share, _harvester(writer, client, bottom, harvest, tms.crs))
        if shard is not None:
            await writer.journal.finish()
            return {"shard": f"{shard[0]}/{shard[1]}", "level": bottom.id,
                    "slabs": sum(1 for r in writer.journal.records() if r.status == "D")}
        for child, parent in zip(matrices, matrices[1:], strict=False):
            if parent.id in plan:
                await writer.run_level(parent, plan[parent.id], _harvester(writer, client, parent, harvest, tms.crs))
            else:
                await compute_upper_level(writer, child, parent, options.upper_filter)
        summary = await writer.finish(harvested_from=harvest.url, requests=client.requests)
        if finish is not None:
            await writer.cleanup(finish)
        return summary


def _harvester(writer: PyramidWriter, client: WmsClient, matrix: TileMatrix, harvest: HarvestOptions, crs: str) -> Any:
    layout = writer.layout(matrix)
    dw, dh = harvest.dimensions or (layout.width, layout.height)
    output = writer.output(matrix)

    async def compute(col: int, row: int) -> EncodedSlab | None:
        x0 = matrix.origin_x + col * layout.width * matrix.cell_size
        y1 = matrix.origin_y - row * layout.height * matrix.cell_size
        boxes = [(x, y, (x0 + x * matrix.cell_size, y1 - (y + dh) * matrix.cell_size,
                         x0 + (x + dw) * matrix.cell_size, y1 - y * matrix.cell_size))
                 for y in range(0, layout.height, dh) for x in range(0, layout.width, dw)]
        payloads = await asyncio.gather(*(client.get_map(bbox, dw, dh) for _, _, bbox in boxes))
        if sum(len(p) for p in payloads) < harvest.threshold:
            return None  # below the threshold: a blank answer, treated as empty
        images = tuple((x, y, dw, dh, payload) for (x, y, _), payload in zip(boxes, payloads, strict=True))
        return await writer.compute(HarvestTask(output, images, harvest.mime))

    return compute
