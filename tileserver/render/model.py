"""What a render is made of and what it makes: a map's layer (`MapLayer`) and a rendered image (`Raster`).

Shared by the level choice, the drawing and the entry points, and by WMS for feature info.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tileserver.catalog import PublishedLayer

from .georef import Grid
from .styles import Style


@dataclass(frozen=True)
class MapLayer:
    """One layer of a map: what to draw, with which style (None = as stored) and kernel."""

    published: PublishedLayer
    style: Style | None = None
    interpolation: str | None = None  # None: the style's, else the layer's `resampling`

    @property
    def active_style(self) -> Style | None:
        return None if self.style is None or self.style.is_identity else self.style

    @property
    def kernel_name(self) -> str:
        style = self.active_style
        for part in (style.estompage, style.pente) if style else ():
            if part is not None and part.interpolation:
                return part.interpolation
        return self.interpolation or self.published.layer.resampling or "linear"


@dataclass
class Raster:
    """A rendered image on `grid`: samples (H, W, C), validity (H, W) and the nodata of the samples."""

    data: np.ndarray
    valid: np.ndarray
    nodata: tuple[float, ...] | None
    grid: Grid
    picture: bool = False  # RGBA uint8 composite (alpha = transparency) rather than data values
    levels: dict[str, str] = field(default_factory=dict)  # layer id → level read (diagnostics)

    @property
    def empty(self) -> bool:
        return not bool(self.valid.any())


def style_usable(style: Style, channels: int, sample_format: str | None) -> bool:
    """Whether a style can run on a layer's data (neighbourhood and palette styles need 1 band)."""
    if sample_format is None:
        return style.is_identity
    if style.border or style.palette or style.terrainrgb:
        return channels == 1
    if style.colorize:
        return channels in (3, 4)
    return True
