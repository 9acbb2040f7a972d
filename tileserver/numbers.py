"""How a float is written, once for the whole server: capabilities and TileJSON (through
`services.numbers`), ROK4 descriptors, GeoTIFF tags and remote requests.

Two spellings, each for a reason: `shortest` for documents people and clients read (`2`, `0.5`,
`1e+20`: integers without a useless `.0`, reads back as the same float), `float_text` where the
reader wants a float literal (`2.0`: a remote WMS's BBOX, rounded coordinates). ROK4 descriptors and
GDAL_NODATA tags write every integral value as an integer, whatever its size (`integers_below=inf`):
what they have always written, so a rewritten descriptor is byte-identical (`integral_text`).
"""

from __future__ import annotations

import math

INTEGER_DIGITS = 1e15  # beyond, an integral float is written with an exponent: 1e+20, not 21 digits


def shortest(value: float, integers_below: float = INTEGER_DIGITS) -> str:
    """Shortest text that reads back as the same float; integral values below `integers_below`
    (absolute) without `.0`. `inf`/`nan` as Python writes them."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < integers_below else repr(value)


def integral_text(value: float) -> str:
    """`shortest` with every integral value as an integer, whatever its size (-3.4e38 in 39 digits):
    ROK4 descriptors' nodata and GDAL's readers (GDAL_NODATA, ASC headers) as always written."""
    return shortest(value, integers_below=math.inf)


def float_text(value: float) -> str:
    """A float as Python writes it back (`2.0`, `1e-05`): what a remote server reads as a float."""
    return repr(float(value))


def rounded(value: float, digits: int = 10) -> str:
    """A coordinate rounded to `digits` decimals: float noise from reprojection is not advertised."""
    return float_text(round(float(value), digits))
