"""The style book: every style the server knows (styles directory, then the store's), and which of
them a layer offers, as maps (WMS, OGC API) and as tiles (WMTS, TMS, OGC API) draw them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tileserver.catalog import PublishedLayer
from tileserver.render.model import style_usable
from tileserver.render.styles import Style, StyleError, load_style, parse_style

log = logging.getLogger("tileserver.wms")

DEFAULT_STYLE = "normal"  # ROK4's identity style: the only one a native tile can honour


IDENTITY = Style(id="normal", identifier="normal", title="Données brutes", abstract="Data as stored")


def _style_book(settings: Any, stored: Mapping[str, Any]) -> dict[str, Style]:
    """Styles by id: the styles directory, then the store's (which win), then `normal` if absent.

    A bad file is logged and skipped: one broken style must not take every layer's styles down."""
    book: dict[str, Style] = {}
    directory = settings.styles_directory
    if directory and Path(directory).is_dir():
        for file in sorted(Path(directory).glob("*.json")):
            if file.name.endswith(".schema.json"):
                continue
            try:
                book[file.stem] = load_style(file)
            except StyleError as exc:
                log.warning("style skipped: %s", exc)
    for style_id, doc in stored.items():
        try:
            book[style_id] = parse_style(doc, style_id, f"store:{style_id}")
        except StyleError as exc:
            log.warning("style skipped: %s", exc)
    book.setdefault("normal", IDENTITY)
    return book


def style_book(runtime: Any) -> dict[str, Style]:
    catalog = runtime.catalog
    return catalog.document(("wms-styles",), lambda: _style_book(runtime.settings, catalog.styles))


def layer_styles(published: PublishedLayer, book: Mapping[str, Style]) -> tuple[Style, ...]:
    """The styles a layer offers, default first; those its data cannot take are left out."""
    by_identifier = {s.identifier: s for s in book.values()}
    out: list[Style] = []
    for name in published.layer.styles:
        style = book.get(name) or by_identifier.get(name)
        if style is not None and style_usable(style, published.channels, published.format.sample_format):
            if all(s.identifier != style.identifier for s in out):
                out.append(style)
    return tuple(out) or (IDENTITY,)


def tile_styles(published: PublishedLayer, book: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Styles a tile can be served in: `normal` as stored, and the layer's styles that change pixels,
    rendered (PNG/JPEG) by the render pipeline. `book`: the style definitions (style_book)."""
    styles: dict[str, Any] = {DEFAULT_STYLE: None}
    if book and not published.format.is_vector:
        for style in layer_styles(published, book):
            if not style.is_identity:
                styles.setdefault(style.identifier, style)
    return styles
