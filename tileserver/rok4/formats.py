"""ROK4 pyramid format codes and how each one's native tiles are served over HTTP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PyramidFormat:
    code: str
    compression: str  # raw, jpg, jpg90, png, lzw, zip, pkb, pbf
    sample_format: str | None  # UINT8, FLOAT32, or None for vector
    mime: str  # Content-Type of a native tile as ROK4 serves it
    tms_extension: str
    ogc_f: str
    content_encoding: str | None = None
    tiff_wrapped: bool = False  # a single-strip TIFF header is prepended when served

    @property
    def is_vector(self) -> bool:
        return self.sample_format is None

    @property
    def dtype(self) -> str:
        return "float32" if self.sample_format == "FLOAT32" else "uint8"


def _tiff(code: str, compression: str, sample: str) -> PyramidFormat:
    return PyramidFormat(code, compression, sample, "image/tiff", "tif", "tiff", tiff_wrapped=True)


FORMATS: dict[str, PyramidFormat] = {
    f.code: f
    for f in (
        PyramidFormat("TIFF_JPG_UINT8", "jpg", "UINT8", "image/jpeg", "jpeg", "jpg"),
        PyramidFormat("TIFF_JPG90_UINT8", "jpg90", "UINT8", "image/jpeg", "jpeg", "jpg"),
        PyramidFormat("TIFF_PNG_UINT8", "png", "UINT8", "image/png", "png", "png"),
        _tiff("TIFF_RAW_UINT8", "raw", "UINT8"),
        _tiff("TIFF_LZW_UINT8", "lzw", "UINT8"),
        _tiff("TIFF_ZIP_UINT8", "zip", "UINT8"),
        _tiff("TIFF_PKB_UINT8", "pkb", "UINT8"),
        _tiff("TIFF_LZW_FLOAT32", "lzw", "FLOAT32"),
        _tiff("TIFF_PKB_FLOAT32", "pkb", "FLOAT32"),
        PyramidFormat("TIFF_RAW_FLOAT32", "raw", "FLOAT32", "image/x-bil;bits=32", "bil", "bil"),
        PyramidFormat(
            "TIFF_ZIP_FLOAT32", "zip", "FLOAT32", "image/x-bil;bits=32", "zbil", "bil", content_encoding="deflate"
        ),
        PyramidFormat("TIFF_PBF_MVT", "pbf", None, "application/x-protobuf", "pbf", "mvt"),
    )
}

# Legacy XML-era codes (core-perl maps them to UINT8)
_LEGACY = {code.replace("_UINT8", "_INT8"): code for code in FORMATS if code.endswith("_UINT8")}

MASK_FORMAT = "TIFF_ZIP_UINT8"


def get_format(code: str) -> PyramidFormat:
    code = _LEGACY.get(code, code)
    try:
        return FORMATS[code]
    except KeyError:
        raise ValueError(f"unknown pyramid format {code!r}") from None


def format_code(compression: str, sample_format: str) -> str:
    """Build a code as ROK4's generation tools do: TIFF_<COMPRESSION>_<SAMPLE>, none → RAW."""
    compression = "raw" if compression.lower() == "none" else compression.lower()
    code = f"TIFF_{compression.upper()}_{sample_format.upper()}"
    get_format(code)
    return code
