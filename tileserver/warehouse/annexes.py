"""Annexes: small files a datastore publishes at a public URL (client styles, thumbnails, documents).

`POST …/annexes` (multipart `file`; `paths`, `labels`, `published` as form fields or query
parameters, lists comma-separated or repeated), list (filters `path`, `labels`, `mime_type`,
`published`), get, `GET …/{annexe}/file`, `PATCH` (`paths`, `labels`, `published`), `PUT` (new file),
`DELETE`, and publication by label (`POST …/annexes/publication|unpublication?labels=…`, answering
the count, as the SDK reads it). A published annex is served without authentication at
`/annexes/{datastore technical name or id}/{path}`; paths are unique within a datastore.

Files live on local disk (`<data_dir>/annexes/<id>`), at most MAX_ANNEXE bytes each; they do not
count against the datastore's quota. A JSON file labelled `type=style` must be a MapLibre / Mapbox GL
style (the label cartes.gouv.fr gives its style annexes).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import re
import uuid
from pathlib import Path
from typing import IO, Any

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.services.ows import base_url
from tileserver.services.vectorstyles import style_problems

from .accounts import Datastore
from .annotations import add_event
from .entities import Entity
from .errors import ApiError, bad_request, conflict, not_found
from .multipart import receive
from .web import Ctx, json_body, json_response, list_response, no_content, public, route

KIND = "annexe"
PREFIX = "/api/datastores/{datastore}/annexes"
PUBLIC_PREFIX = "/annexes"
MAX_ANNEXE = 8 << 20
MAX_PATHS = 20
MAX_LABELS = 50
STYLE_LABEL = "type=style"
# an annex is any file a member uploads, served from this origin: never run as a page here
FILE_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
_HOLDS_PATH = "datastore_id = ? AND EXISTS (SELECT 1 FROM json_each(body, '$.paths') WHERE value IN ({}))"
_SEGMENT = re.compile(r"^[^\x00-\x1f\x7f/\\?#]{1,255}$")


def annexes_root(settings: Any) -> Path:
    return Path(settings.data_dir) / "annexes"


def file_of(settings: Any, annexe_id: str) -> Path:
    return annexes_root(settings) / annexe_id


def normal_path(text: str) -> str:
    """`/a/b.json` from `a/b.json` or `/a/b.json`; 400 for empty, `.`/`..` or control characters."""
    segments = text.strip().strip("/").split("/")
    if not text.strip() or any(s in ("", ".", "..") or not _SEGMENT.match(s) for s in segments):
        raise bad_request(f"paths: {text[:100]!r} is not a path (segments of printable characters, no '.' or '..')")
    return "/" + "/".join(segments)


def _list(value: Any) -> list[str]:
    """A list field: a JSON array, or text (form field, query parameter) split on commas."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise bad_request("paths and labels are arrays of strings")
        return [v.strip() for v in value if v.strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_request(f"{name}: must be true or false")


def annexe_view(entity: Entity) -> dict[str, Any]:
    body = entity.body
    return {"_id": entity.id, "paths": body["paths"], "labels": body["labels"], "published": body["published"],
            "mime_type": body["mime_type"], "size": body["size"], "creation": entity.created_at}


def get_annexe(ctx: Ctx, ident: str) -> Entity:
    entity = ctx.wh.entities.get(KIND, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("annexe", ident)
    return entity


def public_url(request: Request, datastore: Datastore, path: str) -> str:
    return f"{base_url(request)}{PUBLIC_PREFIX}/{datastore.technical_name}{path}"


def _check_paths(ctx: Ctx, paths: list[str], except_id: str | None = None) -> list[str]:
    if not paths:
        raise bad_request("paths: at least one path is required")
    if len(paths) > MAX_PATHS:
        raise bad_request(f"paths: at most {MAX_PATHS}")
    normal = list(dict.fromkeys(normal_path(p) for p in paths))
    for other in holding(ctx.wh.entities, ctx.datastore.id, normal):
        taken = set(other.body["paths"]) & set(normal)
        if other.id != except_id:
            raise conflict(f"paths: {sorted(taken)[0]} is already the path of another annexe of this datastore")
    return normal


def holding(entities: Any, datastore_id: str, paths: list[str]) -> list[Entity]:
    """The annexes of a datastore with one of `paths`."""
    where = _HOLDS_PATH.format(",".join("?" * len(paths)))
    return list(entities.find(KIND, where, (datastore_id, *paths)))


def _check_labels(labels: list[str]) -> list[str]:
    if len(labels) > MAX_LABELS or any(len(label) > 255 for label in labels):
        raise bad_request(f"labels: at most {MAX_LABELS}, each at most 255 characters")
    return list(dict.fromkeys(labels))


class _Limited:
    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.size = file, 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_ANNEXE:
            raise ApiError(413, f"file: an annexe must not exceed {MAX_ANNEXE} bytes")
        self.file.write(data)


async def _receive_file(ctx: Ctx, target: Path) -> tuple[dict[str, str], str, int, Path]:
    """The multipart body's `file` into a temporary file beside `target`: (fields, filename, size, temporary
    file), moved onto `target` by the caller once the request is accepted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with tmp.open("wb") as out:
            sink = _Limited(out)
            received = await receive(ctx.request.stream(), ctx.request.headers.get("content-type", ""), "file",
                                     lambda _: sink)
        return received.fields, received.filename or "", received.size, tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mime(paths: list[str], filename: str) -> str:
    for name in (filename, *paths):
        guessed = mimetypes.guess_type(name)[0]
        if guessed:
            return guessed
    return "application/octet-stream"


def check_style_file(path: Path, what: str) -> None:
    """400 unless the file is a MapLibre / Mapbox GL style document."""
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what}: not JSON: {str(exc)[:200]}") from None
    problems = style_problems(doc)
    if problems:
        raise bad_request(*(f"{what}: not a MapLibre / Mapbox GL style: {p}" for p in problems))


def _is_style(mime_type: str, labels: list[str]) -> bool:
    return STYLE_LABEL in labels and mime_type == "application/json"


@route
async def create_annexe(ctx: Ctx) -> Response:
    annexe_id = str(uuid.uuid4())
    target = file_of(ctx.wh.settings, annexe_id)
    fields, filename, size, tmp = await _receive_file(ctx, target)
    try:
        query = ctx.request.query_params

        def given(name: str) -> list[str]:
            return query.getlist(name) if name in query else _list(fields.get(name, ""))

        paths = _check_paths(ctx, [p for item in given("paths") for p in _list(item)])
        labels = _check_labels([label for item in given("labels") for label in _list(item)])
        published = _flag(query.get("published", fields.get("published", "false")), "published")
        mime_type = _mime(paths, filename)
        if _is_style(mime_type, labels):
            await asyncio.to_thread(check_style_file, tmp, "file")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    body = {"paths": paths, "labels": labels, "published": published, "mime_type": mime_type, "size": size}
    add_event(body, "Création", ctx.user)
    try:
        entity = await asyncio.to_thread(ctx.wh.entities.create, KIND, ctx.datastore.id, body, annexe_id)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return json_response(annexe_view(entity), status=201)


def _has_path(item: dict[str, Any], wanted: str) -> bool:
    try:
        return normal_path(wanted) in item["paths"]
    except ApiError:
        return False


@route
async def list_annexes(ctx: Ctx) -> Response:
    items = [annexe_view(e) for e in ctx.wh.entities.list(KIND, ctx.datastore.id)]
    return list_response(ctx.request, items, {"path": _has_path})


@route
async def get_annexe_route(ctx: Ctx) -> Response:
    return json_response(annexe_view(get_annexe(ctx, ctx.param("annexe"))))


@route
async def annexe_file(ctx: Ctx) -> Response:
    entity = get_annexe(ctx, ctx.param("annexe"))
    return FileResponse(file_of(ctx.wh.settings, entity.id), media_type=entity.body["mime_type"], headers=FILE_HEADERS)


@route
async def modify_annexe(ctx: Ctx) -> Response:
    entity = get_annexe(ctx, ctx.param("annexe"))
    data = await json_body(ctx.request)
    unknown = sorted(set(data) - {"paths", "labels", "published"})
    if unknown:
        raise bad_request(*(f"{k}: unknown field (paths, labels or published)" for k in unknown))
    change: dict[str, Any] = {}
    if "paths" in data:
        change["paths"] = _check_paths(ctx, _list(data["paths"]), except_id=entity.id)
    if "labels" in data:
        change["labels"] = _check_labels(_list(data["labels"]))
    if "published" in data:
        change["published"] = _flag(data["published"], "published")
    if _is_style(entity.body["mime_type"], change.get("labels", entity.body["labels"])):
        await asyncio.to_thread(check_style_file, file_of(ctx.wh.settings, entity.id), "file")

    def apply(body: dict[str, Any]) -> None:
        body.update(change)
        add_event(body, "Modification", ctx.user)

    updated = await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, apply)
    return json_response(annexe_view(updated))


@route
async def replace_annexe_file(ctx: Ctx) -> Response:
    entity = get_annexe(ctx, ctx.param("annexe"))
    target = file_of(ctx.wh.settings, entity.id)
    _, filename, size, tmp = await _receive_file(ctx, target)
    try:
        mime_type = _mime(entity.body["paths"], filename)
        if _is_style(mime_type, entity.body["labels"]):
            await asyncio.to_thread(check_style_file, tmp, "file")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    def apply(body: dict[str, Any]) -> None:
        body.update(size=size, mime_type=mime_type)
        add_event(body, "Remplacement du fichier", ctx.user)

    updated = await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, apply)
    return json_response(annexe_view(updated))


@route
async def delete_annexe(ctx: Ctx) -> Response:
    entity = get_annexe(ctx, ctx.param("annexe"))
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    file_of(ctx.wh.settings, entity.id).unlink(missing_ok=True)
    return no_content()


async def _publish_by_label(ctx: Ctx, published: bool) -> Response:
    labels = [label for item in ctx.request.query_params.getlist("labels") for label in _list(item)]
    if not labels:
        raise bad_request("labels: at least one label is required")
    count = 0
    for entity in ctx.wh.entities.list(KIND, ctx.datastore.id):
        if set(labels) <= set(entity.body["labels"]) and entity.body["published"] != published:
            await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id,
                                    lambda body: body.update(published=published))
            count += 1
    return PlainTextResponse(str(count))


@route
async def publish_by_label(ctx: Ctx) -> Response:
    return await _publish_by_label(ctx, True)


@route
async def unpublish_by_label(ctx: Ctx) -> Response:
    return await _publish_by_label(ctx, False)


@public
async def public_annexe(request: Request) -> Response:
    """A published annex, to anyone: 404 for an unknown datastore or path, or an unpublished annex."""
    from .service import warehouse_of

    wh = warehouse_of(request)
    datastore = await asyncio.to_thread(wh.accounts.get_datastore, request.path_params["datastore"])
    try:
        path = normal_path(request.path_params["path"])
    except ApiError:
        path = ""
    if datastore is not None and path:
        for entity in await asyncio.to_thread(holding, wh.entities, datastore.id, [path]):
            target = file_of(wh.settings, entity.id)
            if entity.body["published"] and target.is_file():
                return FileResponse(target, media_type=entity.body["mime_type"],
                                    headers={"Cache-Control": "public, no-cache", **FILE_HEADERS})
    raise ApiError(404, "no published annexe at this address")


def routes() -> list[BaseRoute]:
    item = PREFIX + "/{annexe}"
    return [
        Route(PREFIX, list_annexes, methods=["GET"]),
        Route(PREFIX, create_annexe, methods=["POST"]),
        Route(PREFIX + "/publication", publish_by_label, methods=["POST"]),
        Route(PREFIX + "/unpublication", unpublish_by_label, methods=["POST"]),
        Route(item, get_annexe_route, methods=["GET"]),
        Route(item, modify_annexe, methods=["PATCH"]),
        Route(item, replace_annexe_file, methods=["PUT"]),
        Route(item, delete_annexe, methods=["DELETE"]),
        Route(item + "/file", annexe_file, methods=["GET"]),
        _public_route(),
    ]


def _public_route() -> Route:
    """`/annexes/{datastore}/{path}` where `path` spans several segments; declared with a plain
    `{path}` so the OpenAPI document names it as a template."""
    route = Route(PUBLIC_PREFIX + "/{datastore}/{path}", public_annexe, methods=["GET"])
    route.path_regex = re.compile(r"^" + re.escape(PUBLIC_PREFIX) + r"/(?P<datastore>[^/]+)/(?P<path>.+)$", re.DOTALL)
    return route
