"""Build parameters, named as the Géoplateforme processings name them, checked once up front."""

from __future__ import annotations

from dataclasses import dataclass

from tileserver.rok4.codecs import COMPRESSIONS, normalize_compression
from tileserver.rok4.descriptor import INTERPOLATIONS
from tileserver.rok4.formats import format_code

from .errors import WriterError
from .reduce import FILTERS

SAMPLE_FORMATS = ("UINT8", "FLOAT32")
DEFAULT_FLOAT_NODATA = -99999.0


@dataclass(frozen=True)
class BuildOptions:
    """What `pyramid build` takes besides the sources and the output.

    None means "from the sources" (channels, sample format, bottom level) or "the grid's top"
    (top level). `nodata` defaults to white (255) for colour channels and transparent (0) for an
    alpha channel, or -99999 for FLOAT32.
    """

    tms: str = "PM"
    bottom: str | None = None
    top: str | None = None
    compression: str = "raw"
    interpolation: str = "bicubic"
    width: int = 16
    height: int = 16
    nodata: tuple[float, ...] | None = None
    samplesperpixel: int | None = None
    sampleformat: str | None = None
    mask: bool = False
    parallelization: int = 1
    upper_filter: str = "auto"
    srs: str | None = None  # CRS of the sources when their files do not say
    srcnodata: tuple[float, ...] | None = None  # nodata of the sources when their files do not say
    path_depth: int = 2

    def checked(self) -> BuildOptions:
        """Normalised copy; WriterError on the first bad value."""
        try:
            compression = normalize_compression(self.compression)
        except ValueError:
            raise WriterError(f"--compression must be one of {', '.join(COMPRESSIONS)} (got {self.compression!r})") from None
        if self.interpolation not in INTERPOLATIONS:
            raise WriterError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)} (got {self.interpolation!r})")
        if self.upper_filter not in FILTERS:
            raise WriterError(f"--upper-filter must be one of {', '.join(FILTERS)} (got {self.upper_filter!r})")
        if self.width < 1 or self.height < 1:
            raise WriterError("--width and --height must be at least 1 tile")
        if self.parallelization < 1:
            raise WriterError("--parallelization must be at least 1")
        if self.samplesperpixel is not None and not 1 <= self.samplesperpixel <= 4:
            raise WriterError("--samplesperpixel must be 1 to 4")
        sampleformat = self.sampleformat.upper() if self.sampleformat else None
        if sampleformat is not None and sampleformat not in SAMPLE_FORMATS:
            raise WriterError(f"--sampleformat must be UINT8 or FLOAT32 (got {self.sampleformat!r})")
        if self.path_depth < 0:
            raise WriterError("path depth must not be negative")
        return BuildOptions(**{**self.__dict__, "compression": compression, "sampleformat": sampleformat})

    def resolved(self, channels: int, sampleformat: str) -> BuildOptions:
        """Copy with channels, sample format and nodata decided, checked against the compression."""
        channels = self.samplesperpixel or channels
        sampleformat = self.sampleformat or sampleformat
        try:
            format_code(self.compression, sampleformat)
        except ValueError:
            raise WriterError(f"compression {self.compression} cannot store {sampleformat} samples") from None
        if self.compression in ("jpg", "jpg90") and channels != 3:
            raise WriterError(f"compression {self.compression} needs 3 channels (got {channels}); "
                              "use --samplesperpixel 3 or another compression")
        if sampleformat == "FLOAT32" and channels != 1:
            raise WriterError(f"FLOAT32 pyramids have 1 channel (got {channels})")
        nodata = self.nodata
        if nodata is None:
            if sampleformat == "FLOAT32":
                nodata = (DEFAULT_FLOAT_NODATA,)
            else:
                nodata = (255.0,) * (channels - 1) + ((0.0,) if channels in (2, 4) else (255.0,))
        elif len(nodata) == 1:
            nodata = nodata * channels
        if len(nodata) != channels:
            raise WriterError(f"--nodata gives {len(nodata)} values for {channels} channels")
        if sampleformat == "UINT8" and any(not (0 <= v <= 255 and float(v).is_integer()) for v in nodata):
            raise WriterError(f"--nodata must be integers 0..255 for UINT8 data (got {nodata})")
        return BuildOptions(**{**self.__dict__, "samplesperpixel": channels, "sampleformat": sampleformat,
                               "nodata": tuple(float(v) for v in nodata)})

    @property
    def format_code(self) -> str:
        assert self.sampleformat is not None
        return format_code(self.compression, self.sampleformat)


def parse_numbers(text: str, what: str) -> tuple[float, ...]:
    """`255,255,255` or `-99999` → floats; WriterError naming the option otherwise."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise WriterError(f"{what} must be comma-separated numbers (got {text!r})") from None
    if not values:
        raise WriterError(f"{what} must give at least one number")
    return values
