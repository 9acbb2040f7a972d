"""WFS configurations: tables of a VECTOR-DB stored data published as the feature types
`layer_name:public_name` of /wfs (and OGC API Features), validated against the base itself.

The body is the platform's: `{"type": "WFS", "name", "layer_name", "type_infos": {"bbox"?,
"used_data": [{"stored_data", "relations": [{"native_name", "public_name"?, "title", "keywords"?,
"abstract"}]}]}, "attribution"?, "metadata"?}`. A layer record holds one base, so `used_data` has
exactly one item here. The record it publishes carries `"wfs": {"base", "relations", "bbox"?}`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tileserver.publication.model import LAYER_ID, NCNAME, Layer, LayerError
from tileserver.publication.status import StoredDataStatus
from tileserver.publication.store import VECTOR_DB

from .errors import ApiError, bad_request
from .layer_records import layer_record
from .web import Ctx

_FIELDS = {"type", "name", "layer_name", "type_infos", "attribution", "metadata"}
_TYPE_INFOS = {"bbox", "used_data"}
_USED = {"stored_data", "relations", "expose_primary_key"}
_RELATION = {"native_name", "public_name", "title", "keywords", "abstract"}


def _text(item: dict[str, Any], key: str, where: str, problems: list[str]) -> None:
    if not isinstance(item.get(key), str) or not item[key].strip():
        problems.append(f"{where}.{key}: a non-empty string is required")


def _relation_problems(relations: Any, tables: set[str], where: str) -> list[str]:
    if not isinstance(relations, list) or not relations:
        return [f"{where}.relations: a non-empty array of {{native_name, public_name, title, abstract}} is required"]
    problems: list[str] = []
    public_names: set[str] = set()
    for i, item in enumerate(relations):
        at = f"{where}.relations[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{at}: must be an object")
            continue
        problems += [f"{at}.{k}: unknown field" for k in sorted(set(item) - _RELATION)]
        native = item.get("native_name")
        if not isinstance(native, str) or not native:
            problems.append(f"{at}.native_name: the name of a table of the stored data is required")
        elif native not in tables:
            problems.append(f"{at}.native_name: the stored data has no table {native}"
                            f" (tables: {', '.join(sorted(tables)) or 'none'})")
        public = item.get("public_name") or native
        if not isinstance(public, str) or not NCNAME.match(public):
            problems.append(f"{at}.public_name: must start with a letter or '_' and hold only letters, digits, '_'"
                            " and '-'")
        elif public in public_names:
            problems.append(f"{at}.public_name: {public} is published twice")
        else:
            public_names.add(public)
        _text(item, "title", at, problems)
        _text(item, "abstract", at, problems)
        keywords = item.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            problems.append(f"{at}.keywords: must be an array of strings")
    return problems


def used_base(ctx: Ctx, used: Any) -> tuple[list[str], str | None]:
    """(problems, URL of the base) of `type_infos.used_data`: one GENERATED VECTOR-DB of this
    datastore whose tables include every relation's native_name."""
    from .stored_data import get_stored

    if not isinstance(used, list) or len(used) != 1 or not isinstance(used[0], dict):
        return ["type_infos.used_data: exactly one {stored_data, relations} is required (a WFS layer publishes"
                " tables of one base)"], None
    item, where = used[0], "type_infos.used_data[0]"
    problems = [f"{where}.{k}: unknown field" for k in sorted(set(item) - _USED)]
    if not isinstance(item.get("stored_data"), str):
        return [*problems, f"{where}.stored_data: a stored data identifier is required"], None
    try:
        stored, _ = get_stored(ctx, item["stored_data"])
    except ApiError:
        return [*problems, f"{where}.stored_data: stored data {item['stored_data']} not found in this datastore"], None
    if stored.type != VECTOR_DB:
        return [*problems, f"{where}.stored_data: stored data {stored.id} is of type {stored.type}; a WFS"
                f" configuration publishes a {VECTOR_DB}"], None
    if stored.status != StoredDataStatus.GENERATED:
        return [*problems, f"{where}.stored_data: stored data {stored.id} is {stored.status}; it must be"
                " GENERATED"], None
    tables = {r["name"] for r in stored.summary.get("type_infos", {}).get("relations", [])}
    problems += _relation_problems(item.get("relations"), tables, where)
    return problems, stored.descriptor_url


def build_wfs_layer(data: dict[str, Any], base: str, restricted: bool = False, record_id: str | None = None) -> Layer:
    """The store's Layer record of a WFS configuration (id `record_id`, shown as layer_name)."""
    infos = data["type_infos"]
    relations = [{"native_name": r["native_name"], "public_name": r.get("public_name") or r["native_name"],
                  "title": r["title"], "abstract": r["abstract"], "keywords": list(r.get("keywords", []))}
                 for r in infos["used_data"][0]["relations"]]
    wfs: dict[str, Any] = {"base": base, "relations": relations}
    if infos.get("bbox"):
        wfs["bbox"] = infos["bbox"]
    keywords = list(dict.fromkeys(k for r in relations for k in r["keywords"]))
    descriptor: dict[str, Any] = {
        "title": data["name"], "abstract": relations[0]["abstract"], "keywords": keywords, "wfs": wfs,
        **{s: {"enabled": s == "ogcapi"} for s in ("wms", "wmts", "tms", "ogcapi")},
    }
    return layer_record(descriptor, data, restricted, record_id)


def wfs_layer(ctx: Ctx, data: dict[str, Any], restricted: bool = False, record_id: str | None = None) -> Layer:
    """The record to publish now (the stored data is checked again: it may have changed since)."""
    problems, base = used_base(ctx, data["type_infos"]["used_data"])
    if problems or base is None:
        raise bad_request(*problems)
    return build_wfs_layer(data, base, restricted, record_id)


def _served_problems(layer: Layer) -> list[str]:
    """Whether the base opens and holds the relations (what the catalog will do when publishing)."""
    from tileserver.catalog import open_vector_base, vector_layer

    assert layer.wfs is not None
    try:
        base = open_vector_base(layer.wfs.base)
    except Exception as exc:  # a missing or unreadable file: the stored data's fault, said as such
        return [f"type_infos.used_data[0].stored_data: the base cannot be read ({exc})"]
    try:
        vector_layer(layer, base)
    except ValueError as exc:
        return [f"type_infos.used_data[0].{exc}"]
    finally:
        base.close()
    return []


async def validate_wfs(ctx: Ctx, data: dict[str, Any], replacing: str | None = None) -> Layer:
    """Every problem of a WFS configuration body (400), then its uniqueness (409). Returns its layer."""
    from .configurations import _check_unique, description_problems, metadata_problems

    problems = [f"{k}: unknown field" for k in sorted(set(data) - _FIELDS)]
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        problems.append("name: a non-empty string is required")
    layer_name = data.get("layer_name")
    if not isinstance(layer_name, str) or not LAYER_ID.match(layer_name) or not NCNAME.match(layer_name):
        problems.append("layer_name: 1–128 letters, digits, '_' or '-', starting with a letter or '_' (it prefixes"
                        " the feature type names)")
    infos = data.get("type_infos")
    base = None
    if not isinstance(infos, dict):
        problems.append("type_infos: an object {used_data, bbox?} is required")
    else:
        problems += [f"type_infos.{k}: unknown field" for k in sorted(set(infos) - _TYPE_INFOS)]
        problems += description_problems(infos, described=False)
        used_problems, base = await asyncio.to_thread(used_base, ctx, infos.get("used_data"))
        problems += used_problems
    problems += metadata_problems(data)
    if problems or base is None:
        raise bad_request(*problems)
    try:
        layer = build_wfs_layer(data, base)
    except LayerError as exc:
        raise bad_request(f"{exc.field}: {exc.message}") from None
    _check_unique(ctx, data, replacing)
    served = await asyncio.to_thread(_served_problems, layer)
    if served:
        raise bad_request(*served)
    return layer
