"""Table and column names as the platform normalises them when it loads a delivery into a base.

The Géoplateforme's "Intégration de données vecteur livrées en base" lower-cases names, strips
accents and hyphens, so that services and SQL filters can name tables without quoting. The rule is
also what a PostGIS backend needs: unquoted identifiers of at most 63 bytes (NAMEDATALEN - 1).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_LENGTH = 63  # PostgreSQL's identifier limit; longer names are silently truncated there
_OTHER = re.compile(r"[^a-z0-9_]")


def normalise(name: str, *, fallback: str = "column") -> str:
    """One name: lower case ASCII, `[a-z0-9_]` only, not starting with a digit, at most 63 chars.

    `fallback` names what is left when nothing survives (a name made only of symbols)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    out = _OTHER.sub("_", ascii_name.lower().replace("-", "_"))
    if not out.strip("_"):
        out = fallback
    if out[0].isdigit():
        out = "_" + out
    return out[:MAX_LENGTH]


def normalise_all(names: Iterable[str], *, fallback: str = "column",
                  taken: Iterable[str] = ()) -> list[str]:
    """Names normalised and made unique in order: the second `Route` and `route` become `route_2`.

    `taken` holds names already in use (the geometry and key columns of a table)."""
    used = set(taken)
    out = []
    for name in names:
        base = normalise(name, fallback=fallback)
        candidate, n = base, 1
        while candidate in used:
            n += 1
            suffix = f"_{n}"
            candidate = base[: MAX_LENGTH - len(suffix)] + suffix
        used.add(candidate)
        out.append(candidate)
    return out
