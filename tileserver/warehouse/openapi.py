"""`GET /api/openapi.json`: an OpenAPI 3.1 document of every warehouse route, built from the
routes themselves and pydantic models of the request bodies (so a new route cannot be forgotten).

Answers are documented as the objects they are, open to extra fields; every route documents the
platform's error body for 400/401/403/404/409.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .web import public


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UploadCreate(_Body):
    name: str
    description: str = ""
    type: Literal["RASTER", "VECTOR"]
    srs: str = Field(examples=["EPSG:2154"])
    contact: str | None = None


class UploadEdit(_Body):
    name: str | None = None
    description: str | None = None


class ExecutionInputs(_Body):
    upload: list[str] = []
    stored_data: list[str] = []


class StoredDataOutput(_Body):
    name: str | None = None  # a new stored data…
    id: str | None = None  # …or the vector base an integration changes
    storage_tags: list[str] = []
    storage_type: str | None = None


class ExecutionOutput(_Body):
    stored_data: StoredDataOutput


class ExecutionCreate(_Body):
    processing: str
    inputs: ExecutionInputs = ExecutionInputs()
    output: ExecutionOutput
    parameters: dict[str, Any] = {}


class UsedData(_Body):
    stored_data: str
    bottom_level: str
    top_level: str


class BBox(_Body):
    west: float
    south: float
    east: float
    north: float


class TypeInfos(_Body):
    title: str
    abstract: str
    keywords: list[str] = []
    bbox: BBox | None = None
    used_data: list[UsedData]
    interpolation: Literal["NEAREST-NEIGHBOUR", "LINEAR", "BICUBIC", "LANCZOS"] | None = None
    styles: list[str] | None = None
    getfeatureinfo: dict[str, Any] | None = None


class WfsRelation(_Body):
    native_name: str
    public_name: str | None = None
    title: str
    keywords: list[str] = []
    abstract: str


class WfsUsedData(_Body):
    stored_data: str
    relations: list[WfsRelation]
    expose_primary_key: bool | None = None


class WfsTypeInfos(_Body):
    bbox: BBox | None = None
    used_data: list[WfsUsedData]


class WmsvRelation(_Body):
    name: str
    style: str | None = None
    ftl: str | None = None


class WmsvUsedData(_Body):
    stored_data: str
    relations: list[WmsvRelation]


class WmsvTypeInfos(_Body):
    title: str
    abstract: str
    keywords: list[str] = []
    bbox: BBox | None = None
    used_data: list[WmsvUsedData]


class StaticEdit(_Body):
    name: str | None = None
    description: str | None = None


class ConfigurationCreate(_Body):
    type: Literal["WMTS-TMS", "WMS-RASTER", "WFS", "WMS-VECTOR"]
    name: str
    layer_name: str
    type_infos: TypeInfos | WfsTypeInfos | WmsvTypeInfos
    attribution: dict[str, Any] | None = None
    metadata: list[dict[str, Any]] = []
    getfeatureinfo: dict[str, Any] | None = None


class OfferingCreate(_Body):
    endpoint: str
    open: bool = True


class OfferingEdit(_Body):
    open: bool


class CommentCreate(_Body):
    text: str


class KeyCreate(_Body):
    name: str
    type: Literal["HASH"] = "HASH"
    type_infos: dict[str, str] = {}


class AccessCreate(_Body):
    offerings: list[str]
    permission: str | None = None


class ConfigurationEdit(_Body):
    name: str | None = None
    extra: dict[str, Any] | None = None  # extra.styles: [{name, technical_name?, current?, layers: [{annexe_id?, url?, name?}]}]


class StoredDataEdit(_Body):
    extra: dict[str, Any] | None = None  # e.g. {legend: {url, annexe_id}} (seed 004)


class AnnexeEdit(_Body):
    paths: list[str] | str | None = None
    labels: list[str] | str | None = None
    published: bool | Literal["true", "false", "True", "False"] | None = None


class TokenRequest(BaseModel):
    grant_type: Literal["password", "client_credentials"]
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    totp: str | None = None


BODIES: dict[str, type[BaseModel] | str] = {
    # endpoint function name → its JSON body (or "multipart" / "tags")
    "create_upload": UploadCreate, "edit_upload": UploadEdit, "create_execution": ExecutionCreate,
    "create_configuration": ConfigurationCreate, "replace_configuration": ConfigurationCreate,
    "create_offering": OfferingCreate, "edit_offering": OfferingEdit, "add_comment": CommentCreate,
    "create_key": KeyCreate, "add_access": AccessCreate, "add_tags": "tags",
    "push_data": "multipart", "push_md5": "multipart", "create_static": "multipart",
    "create_annexe": "multipart", "replace_annexe_file": "multipart", "modify_annexe": AnnexeEdit,
    "modify_configuration": ConfigurationEdit, "modify_stored_data": StoredDataEdit,
    "replace_static": "multipart", "edit_static": StaticEdit,
}
CREATED = {"create_upload", "create_execution", "create_configuration", "create_offering", "create_static",
           "create_key", "add_access", "create_annexe"}
FILES = {"annexe_file", "public_annexe"}  # answer the file as stored, in its own media type
COUNTS = {"publish_by_label", "unpublish_by_label"}  # answer a count as text, as the SDK reads it
PUBLIC = {"public_annexe"}  # no authentication
_ERROR = {"type": "object", "required": ["error", "error_description"],
          "properties": {"error": {"type": "string"}, "error_description": {"type": "array", "items": {"type": "string"}}}}
_ANSWER = {"oneOf": [{"type": "object"}, {"type": "array"}]}
_QUERY = {"page": "page number, from 1", "limit": "items per page"}


def _refs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Move pydantic's `$defs` into components."""
    defs.update(schema.pop("$defs", {}))
    return schema


def _operation(route: Route, method: str, defs: dict[str, Any]) -> dict[str, Any]:
    name = route.endpoint.__name__
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in route.param_convertors]
    if method == "GET" and not route.param_convertors.keys() - {"datastore"} or name.startswith("list_") \
            or name.endswith("_logs"):
        params += [{"name": q, "in": "query", "required": False, "description": d,
                    "schema": {"type": "integer", "minimum": 1}} for q, d in _QUERY.items()]
    if name in ("push_data", "delete_data", "delete_md5"):
        params.append({"name": "path", "in": "query", "required": name != "push_md5", "schema": {"type": "string"}})
    if name == "create_static":
        params += [{"name": q, "in": "query", "required": q != "description", "schema": {"type": "string"}}
                   for q in ("name", "type", "description")]
    if name == "create_annexe":
        params += [{"name": q, "in": "query", "required": False, "description": d, "schema": {"type": "string"}}
                   for q, d in (("paths", "paths, comma-separated or repeated (or a form field)"),
                                ("labels", "labels, comma-separated or repeated (or a form field)"),
                                ("published", "true or false (or a form field)"))]
    if name in COUNTS:
        params.append({"name": "labels", "in": "query", "required": True, "schema": {"type": "string"}})
    ok = "201" if name in CREATED else "204" if method == "DELETE" else "200"
    responses: dict[str, Any] = {ok: {"description": "success"}}
    if name in FILES:
        responses[ok]["content"] = {"*/*": {"schema": {}}}
    elif name in COUNTS:
        responses[ok]["content"] = {"text/plain": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    elif ok != "204":
        responses[ok]["content"] = {"application/json": {"schema": _ANSWER}}
    statuses = ["400", "401", "403", "404", "409", "413", "503"]  # 503: the store cannot be written now
    if BODIES.get(name) == "multipart":
        statuses += ["411", "507"]  # a push reserves its Content-Length; a full disk is the server's
    for status in statuses:
        responses[status] = {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
    operation: dict[str, Any] = {"operationId": f"{name}_{method.lower()}_{abs(hash(route.path)) % 10**6}",
                                 "summary": (route.endpoint.__doc__ or name).strip().split("\n")[0],
                                 "parameters": params, "responses": responses,
                                 "security": [] if name in PUBLIC else [{"bearer": []}]}
    if name in PUBLIC:
        for status in ("401", "403", "409", "413"):
            del responses[status]
    body = BODIES.get(name)
    if body == "multipart":
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}}
    elif body == "tags":
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}}}}
    elif body is not None:
        schema = _refs(body.model_json_schema(ref_template="#/components/schemas/{model}"), defs)  # type: ignore[union-attr]
        defs[body.__name__] = schema  # type: ignore[union-attr]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}  # type: ignore[union-attr]
    return operation


@functools.cache
def document() -> dict[str, Any]:
    from .api import ROUTE_MODULES

    paths: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for module in ROUTE_MODULES:
        for route in module.routes():
            if not isinstance(route, Route) or route.path in ("/api/token",):
                continue
            for method in sorted((route.methods or set()) - {"HEAD"}):
                paths.setdefault(route.path, {})[method.lower()] = _operation(route, method, defs)
    token_schema = TokenRequest.model_json_schema()
    paths["/api/token"] = {"post": {
        "operationId": "token", "summary": "OAuth2 token (password or client_credentials grant)", "security": [],
        "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": token_schema}}},
        "responses": {
            "200": {"description": "a bearer token", "content": {"application/json": {"schema": {
                "type": "object", "required": ["access_token", "token_type", "expires_in"],
                "properties": {"access_token": {"type": "string"}, "token_type": {"const": "Bearer"},
                               "expires_in": {"type": "integer", "exclusiveMinimum": 0}}}}}},
            "400": {"description": "unsupported grant", "content": {"application/json": {"schema": {"type": "object"}}}},
            "401": {"description": "wrong credentials", "content": {"application/json": {"schema": {"type": "object"}}}},
            "413": {"description": "body too large", "content": {"application/json": {"schema": _ERROR}}},
            "429": {"description": "too many failed attempts for this login or address (Retry-After)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "503": {"description": "password checks saturated (Retry-After)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
        }}}
    paths["/api/openapi.json"] = {"get": {"operationId": "openapi", "summary": "this document", "security": [],
                                          "responses": {"200": {"description": "OpenAPI 3.1",
                                                                "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tileserver warehouse API", "version": "1.0",
                 "description": "The Géoplateforme warehouse (Entrepôt) API, self-hosted: uploads, checks, "
                                "processings, stored data, configurations, offerings, statics, keys, annexes."},
        "paths": paths,
        "components": {"schemas": defs,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@public
async def openapi(request: Request) -> Response:
    return JSONResponse(document())


def routes() -> list[Route]:
    return [Route("/api/openapi.json", openapi, methods=["GET"])]
