"""`PATCH …/configurations/{c}` (`name`, `extra`): where cartes.gouv.fr keeps a layer's client styles,
`extra.styles = [{name, technical_name?, current?, layers: [{annexe_id?, url?, name?}]}]` (or, shorter,
`[{name, url | annexe_id}]`).

A style's Mapbox / MapLibre document is its `layers` entry without a `name` (named entries are
per-table SLD / QML files, kept as given). An entry naming an annexe of the datastore gets its public
URL; that annexe must be published and hold a MapLibre style (`version` 8, `sources`, `layers`).
A published WMTS-TMS configuration's layer offers them at once next to its TileJSON
(`/tms/1.0.0/{layer}/styles.json`). Other keys of `extra` are kept as given; PUT leaves `extra` alone.
`PUT …/offerings/{o}` (synchronise), the journey's last call, answers the offering as it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import unicodedata
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.model import STYLE_NAME, LayerError, parse_vector_styles

from .annexes import check_style_file, file_of, get_annexe, public_url
from .annotations import add_event
from .configurations import KIND, PREFIX, configuration_view, get_configuration, published_record
from .errors import ApiError, bad_request
from .layer_records import mapbox_entry, vector_styles
from .offerings import PREFIX as OFFERINGS
from .offerings import get_offering, offering_view
from .web import Ctx, json_body, json_response, route

MAX_STYLES = 50


def technical_name(name: str) -> str:
    """cartes.gouv.fr's suggestion: ASCII, lower case, spaces as `_`, nothing but `[a-z0-9_-]`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().strip().lower()
    return re.sub(r"[^a-z0-9_-]", "", re.sub(r"\s+", "_", ascii_name))


def _entry(ctx: Ctx, entry: dict[str, Any], where: str, is_style: bool) -> dict[str, Any]:
    out = dict(entry)
    ident = entry.get("annexe_id")
    if ident is not None:
        if not isinstance(ident, str):
            raise bad_request(f"{where}.annexe_id: must be an annexe id")
        try:
            annexe = get_annexe(ctx, ident)
        except ApiError:
            raise bad_request(f"{where}.annexe_id: no annexe {ident} in this datastore") from None
        out["annexe_id"] = annexe.id
        out.setdefault("url", public_url(ctx.request, ctx.datastore, annexe.body["paths"][0]))
        if is_style:
            if not annexe.body["published"]:
                raise bad_request(f"{where}.annexe_id: annexe {annexe.id} is not published (its URL answers 404)")
            check_style_file(file_of(ctx.wh.settings, annexe.id), f"{where} (annexe {annexe.id})")
    url = out.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise bad_request(f"{where}.url: an http(s) URL, or an annexe_id, is required")
    return out


def checked_styles(ctx: Ctx, styles: Any) -> list[dict[str, Any]]:
    """`extra.styles` checked, technical names and annexe URLs filled in; 400 naming the problem."""
    if not isinstance(styles, list) or len(styles) > MAX_STYLES:
        raise bad_request(f"extra.styles: must be an array of at most {MAX_STYLES} styles")
    out: list[dict[str, Any]] = []
    for i, style in enumerate(styles):
        where = f"extra.styles[{i}]"
        if not isinstance(style, dict) or not isinstance(style.get("name"), str) or not style["name"].strip():
            raise bad_request(f"{where}: must be an object with a name")
        item = dict(style)
        tech = item.get("technical_name") or technical_name(item["name"]) or f"style{i + 1}"
        if not isinstance(tech, str) or not STYLE_NAME.match(tech) or tech == "default":
            raise bad_request(f"{where}.technical_name: 1–128 letters, digits, '_', '-' or '.' (not 'default')")
        if any(s["technical_name"] == tech for s in out):
            raise bad_request(f"{where}.technical_name: {tech} names two styles")
        item["technical_name"] = tech
        if not isinstance(item.get("current", False), bool):
            raise bad_request(f"{where}.current: must be true or false")
        mapbox = mapbox_entry(style)
        if "layers" in item:
            if not isinstance(item["layers"], list) or not all(isinstance(e, dict) for e in item["layers"]):
                raise bad_request(f"{where}.layers: must be an array of {{name?, url?, annexe_id?}}")
            item["layers"] = [_entry(ctx, e, f"{where}.layers[{j}]", e is mapbox) for j, e in enumerate(item["layers"])]
        if mapbox is style:
            item = _entry(ctx, item, where, True)
        out.append(item)
    return out


@route
async def modify_configuration(ctx: Ctx) -> Response:
    """Partial edit of `name` and `extra`; a published WMTS-TMS layer shows its new styles at once."""
    entity = get_configuration(ctx, ctx.param("configuration"))
    data = await json_body(ctx.request)
    unknown = sorted(set(data) - {"name", "extra"})
    if unknown:
        raise bad_request(*(f"{k}: cannot be modified by PATCH (name and extra only; PUT for the rest)"
                            for k in unknown))
    if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
        raise bad_request("name: must be a non-empty string")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise bad_request("extra: must be an object")
    if "styles" in extra:
        extra = {**extra, "styles": await asyncio.to_thread(checked_styles, ctx, extra["styles"])}

    merged = {**(entity.body.get("extra") or {}), **extra}
    try:
        styles = parse_vector_styles(vector_styles({**entity.body, "extra": merged}))
    except LayerError as exc:
        raise bad_request(f"extra.styles: {exc.message} ({exc.field})") from None

    def apply(body: dict[str, Any]) -> None:
        if "name" in data:
            body["name"] = data["name"]
        body["extra"] = {**(body.get("extra") or {}), **extra}
        add_event(body, "Modification", ctx.user)

    updated = await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, apply)
    record = published_record(ctx, entity.id)
    current = ctx.wh.store.get_layer(record) if record is not None else None
    if current is not None and current.vector_styles != styles:
        await asyncio.to_thread(ctx.wh.store.put_layer, dataclasses.replace(current, vector_styles=styles))
        await ctx.wh.runtime.refresh()
    return json_response(configuration_view(ctx, updated))


@route
async def synchronise_offering(ctx: Ctx) -> Response:
    """`PUT …/offerings/{o}` (the platform's "synchronise", which cartes.gouv.fr calls after editing a
    configuration's styles or metadata): a configuration's PUT or PATCH rewrites its published layer at
    once, so there is nothing left to do; answers the offering."""
    return json_response(offering_view(ctx, get_offering(ctx, ctx.param("offering"))))


def routes() -> list[BaseRoute]:
    return [Route(PREFIX + "/{configuration}", modify_configuration, methods=["PATCH"]),
            Route(OFFERINGS + "/{offering}", synchronise_offering, methods=["PUT"])]
