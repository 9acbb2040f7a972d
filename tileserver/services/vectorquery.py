"""What WFS GetFeature and OGC API Features `/items` share: the query parameters they read alike (a
bbox in a client's CRS, a list of property names), a planned feature query, and the streamed reading
and GeoJSON writing of its answer. Errors are OWS exceptions; OGC API Features turns them into
problems. Both protocol modules import this one, never each other.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from tileserver.catalog import FeatureType
from tileserver.services.ows import OWSException, echo
from tileserver.services.policy import ServiceError, storage_failure
from tileserver.vector import crs as crslib
from tileserver.vector import geojson
from tileserver.vector.base import Feature, Query, Relation
from tileserver.vector.stream import FeatureStream


def bbox_in(relation: Relation, values: list[float], named: crslib.RequestCrs | None) -> tuple[float, float, float, float]:
    """A bbox as written (in `named`, or CRS84/the default) → the relation's srs, x/y."""
    if named is not None and named.yx:
        values = [values[1], values[0], values[3], values[2]]
    source = named.code if named is not None else relation.srs
    if crslib.same(source, relation.srs):
        return (values[0], values[1], values[2], values[3])
    box = crslib.transform_bbox((values[0], values[1], values[2], values[3]), source, relation.srs)
    return (box[0], box[1], box[2], box[3])


def property_names(raw: str | None, relation: Relation, locator: str = "PROPERTYNAME") -> tuple[str, ...] | None:
    if raw is None or not raw.strip():
        return None
    known = {a.name for a in relation.attributes} | ({relation.geometry_column} if relation.geometry_column else set())
    out = []
    for item in raw.strip().strip("()").split(","):
        name = item.strip().rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        if name not in known:
            raise OWSException("InvalidParameterValue", locator, f"{echo(item.strip())} is not a property of {relation.name}")
        out.append(name)
    return tuple(dict.fromkeys(out))


# --- a planned query and its answer ---------------------------------------------------------------


@dataclass
class Plan:
    """A parsed GetFeature: one type, the base query, and how to write the answer."""

    type: FeatureType
    query: Query
    output: str  # "gml" | "json"
    out_crs: crslib.RequestCrs
    hits: bool = False
    by_id: bool = False  # GetFeatureById: the bare feature, 404 when absent


def key_value(relation: Relation, raw: str) -> Any:
    """A feature id from a URL or a RESOURCEID, typed as the relation's primary key."""
    key = relation.primary_key[0] if relation.primary_key else None
    kind = next((a.type for a in relation.attributes if a.name == key), "integer" if key else "string")
    if kind == "integer":
        try:
            return int(raw)
        except ValueError:
            return raw  # matches nothing
    return raw


def written(geom: Any, relation: Relation, out: crslib.RequestCrs) -> Any:
    """A feature's geometry in the answer's CRS and axis order."""
    if geom is None:
        return None
    geom = crslib.transform(geom, relation.srs, out.code)
    return crslib.swap(geom) if out.yx else geom


def timestamp() -> str:
    """A collection's timeStamp: UTC, seconds, `Z`."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


async def count_matched(plan: Plan) -> int:
    try:
        return int(await asyncio.to_thread(plan.type.base.count, replace(plan.query, offset=0, limit=None)))
    except ServiceError:
        raise
    except Exception as exc:
        raise storage_failure(exc, f"count {plan.type.name}") from exc


async def open_stream(plan: Plan) -> tuple[FeatureStream, list[Feature]]:
    """The stream and its first batch, read before anything is sent (a failure is still an error answer)."""
    stream = FeatureStream(plan.type.base, plan.query)
    try:
        first = await stream.first()
    except ServiceError:
        stream.close()
        raise
    except Exception as exc:
        stream.close()
        raise storage_failure(exc, f"read {plan.type.name}") from exc
    return stream, first


async def batches(stream: FeatureStream | None) -> AsyncIterator[list[Feature]]:
    """The stream's batches, its first included; none when nothing was opened (hits, empty page)."""
    if stream is None:
        return
    async for batch in stream:
        yield batch


def features_json(relation: Relation, batch: list[Feature], out: crslib.RequestCrs, names: Any) -> bytes:
    """A batch of GeoJSON features, comma-separated (geometries encoded in one call)."""
    geoms = geojson.geometries([written(item.geometry, relation, out) for item in batch])
    return b",".join(geojson.feature(item.id, item.properties, geom, names)
                     for item, geom in zip(batch, geoms, strict=True))
