"""Image work for maps and non-native tiles.

Pure, synchronous numpy building blocks (no I/O, no asyncio):

- `georef`: `Grid` (CRS + x/y bbox + size) and cached pyproj helpers;
- `warp`: resampling and reprojection with nodata-aware kernels (`warp`, `source_coordinates`);
- `styles`: ROK4 style files (`load_styles_directory`, `apply_style`, `legend_image`);
- `encode`: map output formats (`encode_image`, `blank_image`, `exception_in_image`).

`pipeline` assembles them (level choice, tile fetch, mosaic) for the services.
"""
