"""The one exception the writer raises for user mistakes and unusable inputs.

It is a ValueError so `tileserver.cli.main` prints it as one line; the CLI also maps it to
CommandError explicitly. Messages name the file, option or slab concerned.
"""

from __future__ import annotations


class WriterError(ValueError):
    """Bad input (image, georeferencing, CRS, grid, levels, area) or an output that cannot be written."""
