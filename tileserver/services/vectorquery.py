"""Query parameters of vector feature requests that WFS and OGC API Features read alike: a bbox in
a client's CRS, a list of property names. Errors are OWS exceptions; OGC API Features turns them
into problems."""

from __future__ import annotations

from tileserver.services.ows import OWSException, echo
from tileserver.vector import crs as crslib
from tileserver.vector.base import Relation


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
