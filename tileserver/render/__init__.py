"""Image work for maps and non-native tiles.

Pure, synchronous numpy building blocks (no I/O, no asyncio):

- `georef`: `Grid` (CRS + x/y bbox + size) and cached pyproj helpers;
- `warp`: resampling and reprojection with nodata-aware kernels (`warp`, `source_coordinates`);
- `styles`: ROK4 style files (`load_styles_directory`, `apply_style`, `legend_image`);
- `encode`: map output formats (`encode_image`, `blank_image`, `exception_in_image`).

A render of published layers, from the bottom up (each imports only those before it):

- `errors`: `RenderError` and its kinds, each with the HTTP status it deserves;
- `gate`: admission by count and memory (`RenderGate`, `gate_for`) and the render's `Deadline`;
- `model`: `MapLayer` (what to draw) and `Raster` (what is drawn);
- `levels`: the level and tile window to read (`plan_source`, `SourcePlan`);
- `fetch`: the stored tiles, read concurrently (the only I/O);
- `draw`: mosaic, resample, style, composite, in strips, in a worker thread;
- `pipeline`: the entry points the services call (`render_map`, `render_tile`).
"""


def compiled_kernels() -> dict[str, bool]:
    """Which optional compiled kernels this install built (setup.py): without one, its work runs in
    numpy, BLAS or Pillow, same pixels for about twice the CPU. /healthcheck/info shows it to operators."""
    import importlib.util

    return {name: importlib.util.find_spec(f"tileserver.render._{name}") is not None
            for name in ("separable", "pixels", "mesh")}
