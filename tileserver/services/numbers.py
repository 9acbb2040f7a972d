"""Numbers in requests and documents: how a tile index or a size is read, and (from
`tileserver.numbers`, the one writer of floats, which ROK4 descriptors use too) how a float is written.

One spelling everywhere, so a number in a capabilities document, a TileJSON or a feature-info answer
reads back as the same float; one reading of the indices a client writes, so a malformed one and an
absurd one (more digits than any grid holds: refused without arithmetic) get the same answer in every
protocol, each in its own error format.
"""

from __future__ import annotations

import re

from tileserver.numbers import float_text, rounded, shortest

__all__ = [
    "MAX_INDEX_DIGITS", "BadIndex", "float_text", "is_plain_index", "parse_index", "positive_int", "rounded", "shortest",
]

MAX_INDEX_DIGITS = 12  # longer col/row/level numbers are absurd: no grid holds them
_INDEX = re.compile(r"^[+-]?\d+$")


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
