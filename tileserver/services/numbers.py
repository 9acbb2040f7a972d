"""Numbers in requests and documents: how a float is written, how a tile index or a size is read.

One spelling everywhere, so a number in a capabilities document, a TileJSON or a feature-info answer
reads back as the same float; one reading of the indices a client writes, so a malformed one and an
absurd one (more digits than any grid holds: refused without arithmetic) get the same answer in every
protocol, each in its own error format.
"""

from __future__ import annotations

import re

MAX_INDEX_DIGITS = 12  # longer col/row/level numbers are absurd: no grid holds them
_INDEX = re.compile(r"^[+-]?\d+$")


def shortest(value: float) -> str:
    """Shortest text that reads back as the same float, without a useless `.0` (no exponent for the
    usual magnitudes)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def float_text(value: float) -> str:
    """A float as Python writes it back (`2.0`, `1e-05`): what a remote server reads as a float."""
    return repr(float(value))


def rounded(value: float, digits: int = 10) -> str:
    """A coordinate rounded to `digits` decimals: float noise from reprojection is not advertised."""
    return repr(round(float(value), digits))


class BadIndex(ValueError):
    """Not a tile index. `absurd`: digits, but more than any grid holds (a 404 where the protocol
    tells a missing tile from a malformed request)."""

    def __init__(self, absurd: bool) -> None:
        super().__init__("absurd index" if absurd else "not an integer")
        self.absurd = absurd


def parse_index(text: str) -> int:
    """A tile index (`[+-]digits`); raises BadIndex."""
    if not _INDEX.match(text):
        raise BadIndex(absurd=False)
    if len(text.lstrip("+-")) > MAX_INDEX_DIGITS:
        raise BadIndex(absurd=True)
    return int(text)


def is_plain_index(text: str) -> bool:
    """Unsigned ASCII digits a grid can hold: the fast path's test before it does anything else."""
    return 0 < len(text) <= MAX_INDEX_DIGITS and text.isascii() and text.isdigit()


def positive_int(text: str, max_digits: int) -> int | None:
    """A positive integer (`+` allowed) of at most `max_digits` digits; None for anything else."""
    text = text.strip()
    if not re.fullmatch(rf"\+?\d{{1,{max_digits}}}", text) or int(text) <= 0:
        return None
    return int(text)
