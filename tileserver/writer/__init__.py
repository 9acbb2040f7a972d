"""The pyramid writer: georeferenced images or a WMS → a ROK4 raster pyramid, on disk or S3.

Python API (each returns the summary dict the platform shows for a stored pyramid):

* `build_pyramid(sources, output, name, BuildOptions(...))` — sync; `build_async(..., storage)`
  on an open `Storage`; `shard=(K, N)` / `finish=N` split a build over N workers;
* `harvest_async(HarvestOptions.from_text(...), output, name, BuildOptions(...), storage)`;
* `update_async(ancestor_descriptor, sources, output, name, UpdateOptions(...), storage)`;
* `pyramid_summary(descriptor, tms, size)` summarises any pyramid.

Modules: `sources` (images and georeferencing), `plan` (levels and slabs), `resample` (bottom
level), `reduce` (upper levels), `encode` (slab bytes, work files), `tasks` (worker units),
`engine` (run, journal, list, descriptor), `build`/`harvest`/`update` (the three processings),
`cli` (`tileserver pyramid build|harvest|update`).
"""

from .build import build_async, build_pyramid
from .errors import WriterError
from .harvest import HarvestOptions, harvest_async
from .options import BuildOptions
from .summary import pyramid_summary
from .update import UpdateOptions, update_async

__all__ = [
    "BuildOptions",
    "HarvestOptions",
    "UpdateOptions",
    "WriterError",
    "build_async",
    "build_pyramid",
    "harvest_async",
    "pyramid_summary",
    "update_async",
]
