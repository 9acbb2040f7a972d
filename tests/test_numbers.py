"""One writer of floats (tileserver.numbers) for documents, ROK4 descriptors and GeoTIFF tags, each
spelling kept as it was written before it was shared (issue 12 item 14)."""

from __future__ import annotations

import json

from tileserver.numbers import float_text, integral_text, rounded, shortest
from tileserver.rok4.descriptor import parse_descriptor
from tileserver.services import numbers as service_numbers

FLOAT32_MIN = -3.4028234663852886e38


def test_spellings() -> None:
    assert [shortest(v) for v in (2.0, 0.5, 1e20, -0.0, float("inf"))] == ["2", "0.5", "1e+20", "0", "inf"]
    assert integral_text(1e20) == "100000000000000000000"
    assert integral_text(FLOAT32_MIN) == str(int(FLOAT32_MIN))
    assert float_text(2) == "2.0"
    assert rounded(0.1 + 0.2) == "0.3"
    for value in (2.0, 0.1, 1e20, FLOAT32_MIN, 123456.789):
        assert float(shortest(value)) == float(integral_text(value)) == float(float_text(value)) == value


def test_services_write_with_the_same_functions() -> None:
    assert service_numbers.shortest is shortest
    assert service_numbers.rounded is rounded


def test_descriptor_nodata_is_written_as_before() -> None:
    """A DEM descriptor's float32 nodata comes back in all its digits, as ROK4 descriptors were written."""
    raw = {
        "format": "TIFF_ZIP_FLOAT32",
        "tile_matrix_set": "PM",
        "levels": [{
            "id": "10", "tiles_per_width": 16, "tiles_per_height": 16,
            "storage": {"type": "FILE", "image_directory": "D/DATA/10", "path_depth": 2},
            "tile_limits": {"min_col": 0, "max_col": 0, "min_row": 0, "max_row": 0},
        }],
        "raster_specifications": {"channels": 1, "nodata": repr(FLOAT32_MIN), "photometric": "gray",
                                  "interpolation": "bicubic"},
    }
    descriptor = parse_descriptor(json.dumps(raw).encode())
    written = json.loads(descriptor.to_json())
    assert written["raster_specifications"]["nodata"] == str(int(FLOAT32_MIN))
