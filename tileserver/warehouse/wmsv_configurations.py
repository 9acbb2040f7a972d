"""WMS-VECTOR configurations: tables of a VECTOR-DB stored data drawn server-side as one WMS layer
of /wms (beside the raster layers), each with its SLD (`GEOSERVER-STYLE` static) and GetFeatureInfo
template (`GEOSERVER-FTL` static).

The body is the platform's: `{"type": "WMS-VECTOR", "name", "layer_name", "type_infos": {"title",
"abstract", "keywords", "bbox"?, "used_data": [{"stored_data", "relations": [{"name", "style"?,
"ftl"?}]}]}, "attribution"?, "metadata"?}`. The first relation is drawn on top; a relation without
style is drawn in the platform's default blue. Validated as the platform does: the tables exist in
the base, each SLD's `NamedLayer/Name` is its table's name, and every attribute the SLD or the
template reads is a column of the table. A layer record holds one base, so `used_data` has exactly
one item here. The record carries `"vector_map": {"base", "relations": [{name, style, sld, ftl,
template}]}`: the documents themselves, so every process draws the same version.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from tileserver.publication.model import LAYER_ID, Layer, LayerError
from tileserver.publication.status import StoredDataStatus
from tileserver.publication.store import VECTOR_DB
from tileserver.render import sld

from .errors import ApiError, bad_request
from .layer_records import layer_record
from .web import Ctx

TYPE = "WMS-VECTOR"
_FIELDS = {"type", "name", "layer_name", "type_infos", "attribution", "metadata"}
_TYPE_INFOS = {"title", "abstract", "keywords", "bbox", "used_data"}
_USED = {"stored_data", "relations"}
_RELATION = {"name", "style", "ftl"}


def _columns(relation: Any) -> list[str]:
    return [a.name for a in relation.attributes] + ([relation.geometry_column] if relation.geometry_column else [])


def style_problems(style_body: dict[str, Any], relation: Any, where: str) -> list[str]:
    """The platform's refusals of an SLD for a table: another NamedLayer/Name, a missing attribute."""
    try:
        parsed = sld.parse(style_body["content"].encode("utf-8"))
        sld.check_for_table(parsed, relation.name, _columns(relation))
    except sld.StyleError as exc:
        return [f"{where}: {exc}"]
    return []


def template_problems(ftl_body: dict[str, Any], relation: Any, where: str) -> list[str]:
    columns = set(_columns(relation))
    missing = [name for name in ftl_body.get("used_attributes", []) if name not in columns]
    if missing:
        return [f"{where}: the template uses attribute(s) {', '.join(missing)} which table {relation.name!r} lacks"
                f" (its attributes: {', '.join(sorted(columns))})"]
    return []


def _static(ctx: Ctx, ident: Any, kind: str, where: str, problems: list[str]) -> dict[str, Any] | None:
    from .statics import KIND as STATIC

    if not isinstance(ident, str) or not ident:
        problems.append(f"{where}: a {kind} static identifier is required")
        return None
    entity = ctx.wh.entities.get(STATIC, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id or entity.body.get("type") != kind:
        problems.append(f"{where}: no {kind} static {ident} in this datastore")
        return None
    return entity.body


def used_relations(ctx: Ctx, used: Any) -> tuple[list[str], str | None, list[dict[str, str]]]:
    """(problems, URL of the base, the record's relations) of `type_infos.used_data` (blocking: a thread)."""
    from tileserver.catalog import open_vector_base

    from .stored_data import get_stored

    if not isinstance(used, list) or len(used) != 1 or not isinstance(used[0], dict):
        return ["type_infos.used_data: exactly one {stored_data, relations} is required (a WMS-VECTOR layer draws"
                " tables of one base)"], None, []
    item, where = used[0], "type_infos.used_data[0]"
    problems = [f"{where}.{k}: unknown field" for k in sorted(set(item) - _USED)]
    if not isinstance(item.get("stored_data"), str):
        return [*problems, f"{where}.stored_data: a stored data identifier is required"], None, []
    try:
        stored, _ = get_stored(ctx, item["stored_data"])
    except ApiError:
        return [*problems, f"{where}.stored_data: stored data {item['stored_data']} not found in this datastore"], None, []
    if stored.type != VECTOR_DB:
        return [*problems, f"{where}.stored_data: stored data {stored.id} is of type {stored.type}; a WMS-VECTOR"
                f" configuration draws a {VECTOR_DB}"], None, []
    if stored.status != StoredDataStatus.GENERATED:
        return [*problems, f"{where}.stored_data: stored data {stored.id} is {stored.status}; it must be"
                " GENERATED"], None, []
    relations = item.get("relations")
    if not isinstance(relations, list) or not relations:
        return [*problems, f"{where}.relations: a non-empty array of {{name, style, ftl?}} is required"], None, []
    try:
        base = open_vector_base(stored.descriptor_url)
    except Exception as exc:  # a missing or unreadable file: the stored data's fault, said as such
        return [*problems, f"{where}.stored_data: the base cannot be read ({exc})"], None, []
    out: list[dict[str, str]] = []
    try:
        tables = {r.name: r for r in base.relations()}
        seen: set[str] = set()
        for i, entry in enumerate(relations):
            at = f"{where}.relations[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{at}: must be an object {{name, style, ftl?}}")
                continue
            problems += [f"{at}.{k}: unknown field" for k in sorted(set(entry) - _RELATION)]
            name = entry.get("name")
            relation = tables.get(name) if isinstance(name, str) else None
            if relation is None:
                problems.append(f"{at}.name: the stored data has no table {name}"
                                f" (tables: {', '.join(sorted(tables)) or 'none'})")
                continue
            if relation.name in seen:
                problems.append(f"{at}.name: table {name} is drawn twice")
            seen.add(relation.name)
            if relation.geometry_column is None:
                problems.append(f"{at}.name: table {name} has no geometry to draw")
            record: dict[str, str] = {"name": relation.name}
            if entry.get("style") is not None:
                body = _static(ctx, entry["style"], "GEOSERVER-STYLE", f"{at}.style", problems)
                if body is not None:
                    problems += style_problems(body, relation, f"{at}.style")
                    record.update(style=entry["style"].lower(), sld=body["content"])
            if entry.get("ftl") is not None:
                body = _static(ctx, entry["ftl"], "GEOSERVER-FTL", f"{at}.ftl", problems)
                if body is not None:
                    problems += template_problems(body, relation, f"{at}.ftl")
                    record.update(ftl=entry["ftl"].lower(), template=body["content"])
            out.append(record)
    finally:
        base.close()
    return problems, stored.descriptor_url, out


def build_wmsv_layer(data: dict[str, Any], base: str, relations: list[dict[str, str]], restricted: bool = False,
                     record_id: str | None = None) -> Layer:
    """The store's Layer record of a WMS-VECTOR configuration (id `record_id`, shown as layer_name)."""
    infos = data["type_infos"]
    descriptor: dict[str, Any] = {
        "title": infos["title"], "abstract": infos["abstract"], "keywords": list(infos.get("keywords", [])),
        "vector_map": {"base": base, "relations": relations},
        **{s: {"enabled": s == "wms"} for s in ("wms", "wmts", "tms", "ogcapi")},
    }
    if infos.get("bbox"):
        descriptor["bbox"] = infos["bbox"]
    return layer_record(descriptor, data, restricted, record_id)


def wmsv_layer(ctx: Ctx, data: dict[str, Any], restricted: bool = False, record_id: str | None = None) -> Layer:
    """The record to publish now (the base and statics are read again: they may have changed since)."""
    problems, base, relations = used_relations(ctx, data["type_infos"]["used_data"])
    if problems or base is None:
        raise bad_request(*problems)
    return build_wmsv_layer(data, base, relations, restricted, record_id)


async def validate_wmsv(ctx: Ctx, data: dict[str, Any], replacing: str | None = None) -> Layer:
    """Every problem of a WMS-VECTOR configuration body (400), then its uniqueness (409). Returns its layer."""
    from .configurations import _check_unique, _string, description_problems, metadata_problems

    problems = [f"{k}: unknown field" for k in sorted(set(data) - _FIELDS)]
    _string(data, "name", "", problems)
    if not isinstance(data.get("layer_name"), str) or not LAYER_ID.match(data["layer_name"]):
        problems.append("layer_name: 1–128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    infos = data.get("type_infos")
    base: str | None = None
    relations: list[dict[str, str]] = []
    if not isinstance(infos, dict):
        problems.append("type_infos: an object {title, abstract, keywords, bbox?, used_data} is required")
    else:
        problems += [f"type_infos.{k}: unknown field" for k in sorted(set(infos) - _TYPE_INFOS)]
        problems += description_problems(infos)
        used_problems, base, relations = await asyncio.to_thread(used_relations, ctx, infos.get("used_data"))
        problems += used_problems
    problems += metadata_problems(data)
    if problems or base is None:
        raise bad_request(*problems)
    try:
        layer = build_wmsv_layer(data, base, relations)
    except LayerError as exc:
        raise bad_request(f"{exc.field}: {exc.message}") from None
    _check_unique(ctx, data, replacing)
    return layer


# --- statics replaced under published layers -------------------------------------------------------------


def static_fits(ctx: Ctx, static_id: str, kind: str, fields: dict[str, Any], users: list[str]) -> list[str]:
    """Whether a re-uploaded style or template still fits every relation using it (blocking)."""
    from tileserver.catalog import open_vector_base

    from .configurations import KIND as CONFIGURATION
    from .stored_data import get_stored

    problems: list[str] = []
    key = "style" if kind == "GEOSERVER-STYLE" else "ftl"
    for configuration_id in users:
        configuration = ctx.wh.entities.get(CONFIGURATION, configuration_id)
        if configuration is None or configuration.body["type"] != TYPE:
            continue
        for item in configuration.body["type_infos"]["used_data"]:
            try:
                stored, _ = get_stored(ctx, item["stored_data"])
                base = open_vector_base(stored.descriptor_url)
            except Exception:  # noqa: S112 - a vanished base is the configuration's problem, found at publication
                continue
            try:
                for relation_item in item.get("relations", []):
                    relation = base.relation(relation_item["name"])
                    if relation is None or str(relation_item.get(key, "")).lower() != static_id:
                        continue
                    where = f"file: configuration {configuration_id}, table {relation.name}"
                    check = style_problems if key == "style" else template_problems
                    problems += check(fields, relation, where)
            finally:
                base.close()
    return problems


async def republish_using(ctx: Ctx, users: list[str]) -> None:
    """Rewrite the published records of the WMS-VECTOR configurations in `users` (their statics changed)."""
    from .configurations import KIND as CONFIGURATION
    from .configurations import published_record

    for configuration_id in users:
        configuration = ctx.wh.entities.get(CONFIGURATION, configuration_id)
        if configuration is None or configuration.body["type"] != TYPE:
            continue
        record = published_record(ctx, configuration_id)
        current = ctx.wh.store.get_layer(record) if record is not None else None
        if current is None:
            continue
        layer = await asyncio.to_thread(wmsv_layer, ctx, configuration.body, current.restricted, record)
        await asyncio.to_thread(ctx.wh.store.put_layer, replace(layer, restricted=current.restricted))
