"""tileserver: OGC tile and map server for ROK4 raster pyramids, with its pyramid writer."""

__version__ = "0.1.0"
