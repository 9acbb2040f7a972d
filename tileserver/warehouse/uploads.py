"""Uploads ("livraisons"): create, push data and md5 files, tree, close (→ checks), open, delete.

Files are streamed to disk under the data directory, never past the datastore's quota; a push
that fails or is refused leaves nothing. Closing starts the checks (CHECKING), which end the
upload CLOSED or UNSTABLE.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.status import RUNNING, JobStatus, UploadStatus
from tileserver.publication.store import Connection

from .annotations import add_event, annotation_routes, annotations_view
from .checks import checks_for
from .entities import Entity
from .errors import ApiError, bad_request, conflict, not_found
from .lifecycle import CHECK, EXECUTION, UPLOAD, close_upload, create, reopen_upload
from .multipart import receive
from .upload_files import S3UploadFiles, UploadFiles, checked_path, upload_files
from .usage import UPLOADS, holds, release, reserve
from .web import Ctx, json_body, json_response, list_response, no_content, route

KIND = UPLOAD
UPLOAD_TYPES = ("RASTER", "VECTOR")
PREFIX = "/api/datastores/{datastore}/uploads"


def upload_view(entity: Entity) -> dict[str, Any]:
    body = entity.body
    out = {"_id": entity.id, "name": body["name"], "description": body.get("description", ""),
           "type": body["type"], "srs": body.get("srs"), "status": body["status"], "size": body.get("size", 0),
           "creation": entity.created_at, "contact": body.get("contact", ""), **annotations_view(body)}
    for key in ("extent", "type_infos"):
        if key in body:
            out[key] = body[key]
    return out


def get_upload(ctx: Ctx, upload_id: str) -> Entity:
    entity = ctx.wh.entities.get(KIND, upload_id.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("upload", upload_id)
    return entity


def files_of(ctx: Ctx, entity: Entity) -> UploadFiles | S3UploadFiles:
    return upload_files(ctx.wh.settings, entity.id)


def _check_srs(srs: Any) -> str | None:
    if not isinstance(srs, str) or not srs:
        return "srs: a coordinate reference system such as EPSG:2154 is required"
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(srs)
    except CRSError:
        return f"srs: unknown coordinate reference system {srs!r}"
    return None


@route
async def list_uploads(ctx: Ctx) -> Response:
    items = [upload_view(e) for e in ctx.wh.entities.list(KIND, ctx.datastore.id)]
    return list_response(ctx.request, items)


@route
async def create_upload(ctx: Ctx) -> Response:
    data = await json_body(ctx.request)
    problems = []
    unknown = set(data) - {"name", "description", "type", "srs", "contact", "type_infos"}
    problems += [f"{k}: unknown field" for k in sorted(unknown)]
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        problems.append("name: a non-empty string is required")
    if not isinstance(data.get("description", ""), str):
        problems.append("description: must be a string")
    if data.get("type") not in UPLOAD_TYPES:
        problems.append(f"type: must be one of {', '.join(UPLOAD_TYPES)} (got {data.get('type')!r})")
    srs_problem = await asyncio.to_thread(_check_srs, data.get("srs"))
    if srs_problem:
        problems.append(srs_problem)
    if problems:
        raise bad_request(*problems)
    body: dict[str, Any] = {"name": data["name"], "description": data.get("description", ""), "type": data["type"],
                            "srs": data["srs"], "size": 0, "round": 0, "tags": {},
                            "contact": data.get("contact", ctx.user.email)}
    add_event(body, "Création", ctx.user)
    entity = await asyncio.to_thread(create, ctx.wh.entities, KIND, ctx.datastore.id, body)
    return json_response(upload_view(entity), status=201)


@route
async def get_upload_route(ctx: Ctx) -> Response:
    return json_response(upload_view(get_upload(ctx, ctx.param("upload"))))


@route
async def edit_upload(ctx: Ctx) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    data = await json_body(ctx.request)
    problems = [f"{k}: cannot be changed" for k in data if k not in ("name", "description")]
    problems += [f"{k}: must be a non-empty string" for k in ("name", "description")
                 if k in data and (not isinstance(data[k], str) or (k == "name" and not data[k].strip()))]
    if problems:
        raise bad_request(*problems)
    updated = await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, lambda body: body.update(data))
    return json_response(upload_view(updated))


def _executions_using(ctx: Ctx, upload_id: str) -> list[Entity]:
    return [e for e in ctx.wh.entities.list(EXECUTION, ctx.datastore.id)
            if e.body.get("status") in RUNNING
            and any(u["_id"] == upload_id for u in e.body.get("inputs", {}).get("upload", []))]


@route
async def delete_upload(ctx: Ctx) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    if entity.body["status"] == UploadStatus.CHECKING:
        raise conflict(f"upload {entity.id} is being checked; delete it once the checks ended")
    if _executions_using(ctx, entity.id):
        raise conflict(f"upload {entity.id} is the input of a running processing execution")

    def no_push_running(db: Connection) -> None:
        if holds(db, entity.id):  # the push's files would land in a removed upload
            raise conflict(f"upload {entity.id}: a file is still being pushed; delete it once the push ended")

    await asyncio.to_thread(ctx.wh.entities.delete, entity.id, False, no_push_running)
    for check in ctx.wh.entities.find(CHECK, "json_extract(body, '$.upload._id') = ?", (entity.id,)):
        await asyncio.to_thread(ctx.wh.entities.delete, check.id)
    await asyncio.to_thread(files_of(ctx, entity).remove_all)
    return no_content()


def _require_open(entity: Entity) -> None:
    if entity.body["status"] != UploadStatus.OPEN:
        raise bad_request(f"upload {entity.id} is {entity.body['status']}: files can be changed only while it is"
                          " OPEN (POST …/open)")


async def _refresh_size(ctx: Ctx, entity: Entity) -> None:
    size = await asyncio.to_thread(files_of(ctx, entity).size)
    await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, lambda body: body.update(size=size))


class _ReservedSink:
    """Writes the pushed file, never past the room reserved for it (its announced length)."""

    def __init__(self, handle: Any, room: int) -> None:
        self.handle = handle
        self.room = room
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.room:
            raise bad_request(f"the body is longer than its Content-Length ({self.room} bytes)")
        self.handle.write(data)


def _still_open(upload_id: str) -> Callable[[Connection], None]:
    """Reservation guard: a push may start only while the upload is OPEN (not once close began)."""

    def guard(db: Connection) -> None:
        row = db.execute("SELECT json_extract(body, '$.status') FROM wh_entities WHERE id = ? AND kind = ?",
                         (upload_id, KIND)).fetchone()
        if row is None:
            raise not_found("upload", upload_id)
        if row[0] != UploadStatus.OPEN:
            raise bad_request(f"upload {upload_id} is {row[0]}: files can be pushed only while it is OPEN")

    return guard


def _disk_full(exc: OSError) -> ApiError | None:
    """A full disk, a disk quota or a file size limit of the server: 507, the push left nothing."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ApiError(507, "the server has no room left to store this file; nothing was kept")
    return None


async def _push(ctx: Ctx, section: str) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    _require_open(entity)
    files = files_of(ctx, entity)
    query_path = ctx.request.query_params.get("path")
    rel: str | None
    if section == "data":
        rel = checked_path(query_path)
    else:
        rel = checked_path(query_path) if query_path else None
    length = ctx.request.headers.get("content-length", "")
    if not length.isdigit():
        raise ApiError(411, "Content-Length is required: the upload quota is reserved before the file arrives")
    # the announced length is reserved at once (atomically with the quota check and the upload
    # being OPEN), so parallel pushes cannot overrun the quota; released however the push ends
    reservation = await asyncio.to_thread(reserve, ctx.wh.store, ctx.datastore, UPLOADS, int(length), entity.id,
                                          _still_open(entity.id))
    try:
        temp, handle = files.open_temp()
        try:
            received = await receive(ctx.request.stream(), ctx.request.headers.get("content-type", ""), "file",
                                     lambda filename: _ReservedSink(handle, int(length)))
            handle.close()
            if rel is None:
                rel = checked_path(Path(received.filename or "").name, "filename")
            await asyncio.to_thread(files.ensure_free, section, rel)
            await asyncio.to_thread(files.store, temp, section, rel)
        except OSError as exc:
            full = _disk_full(exc)
            if full is None:
                raise
            raise full from None
        finally:
            handle.close()
            temp.unlink(missing_ok=True)
        await _refresh_size(ctx, entity)
    finally:
        await asyncio.to_thread(release, ctx.wh.store, reservation)
    return json_response({"path": rel, "size": received.size})


@route
async def push_data(ctx: Ctx) -> Response:
    return await _push(ctx, "data")


@route
async def push_md5(ctx: Ctx) -> Response:
    return await _push(ctx, "md5")


async def _delete_file(ctx: Ctx, section: str) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    _require_open(entity)
    rel = checked_path(ctx.request.query_params.get("path"))
    if not await asyncio.to_thread(files_of(ctx, entity).delete, section, rel):
        raise not_found("file", rel)
    await _refresh_size(ctx, entity)
    return no_content()


@route
async def delete_data(ctx: Ctx) -> Response:
    return await _delete_file(ctx, "data")


@route
async def delete_md5(ctx: Ctx) -> Response:
    return await _delete_file(ctx, "md5")


@route
async def tree(ctx: Ctx) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    return json_response(await asyncio.to_thread(files_of(ctx, entity).tree))


@route
async def close(ctx: Ctx) -> Response:
    """OPEN → CHECKING; one check execution per check of the upload's type, run in the background."""
    entity = get_upload(ctx, ctx.param("upload"))
    if entity.body["status"] != UploadStatus.OPEN:
        raise conflict(f"upload {entity.id} is {entity.body['status']}, not OPEN")

    def no_push_running(db: Connection) -> None:
        if holds(db, entity.id):
            raise conflict(f"upload {entity.id}: a file is still being pushed; close it once the push ended")

    checks = [(check.id, check.name) for check in checks_for(entity.body["type"])]
    updated, closed = await asyncio.to_thread(close_upload, ctx.wh.entities, entity.id, checks,
                                              lambda body: add_event(body, "Fermeture", ctx.user), no_push_running)
    if not closed:
        raise conflict(f"upload {entity.id} is {updated.body['status']}, not OPEN")
    ctx.wh.wake()
    return json_response(upload_view(updated))


@route
async def reopen(ctx: Ctx) -> Response:
    entity = get_upload(ctx, ctx.param("upload"))
    if _executions_using(ctx, entity.id):
        raise conflict(f"upload {entity.id} is the input of a running processing execution")
    updated, opened = await asyncio.to_thread(reopen_upload, ctx.wh.entities, entity.id,
                                              lambda body: add_event(body, "Ouverture", ctx.user))
    if not opened:
        raise conflict(f"upload {entity.id} is {updated.body['status']}: it can be opened once CLOSED or UNSTABLE")
    return json_response(upload_view(updated))


def check_execution_view(entity: Entity) -> dict[str, Any]:
    body = entity.body
    out = {"_id": entity.id, "check": body["check"], "status": body["status"], "creation": entity.created_at,
           "upload": body["upload"]}
    for key in ("start", "finish"):
        if body.get(key):
            out[key] = body[key]
    return out


@route
async def upload_checks(ctx: Ctx) -> Response:
    """The checks of the last close: `{asked, in_progress, passed, failed}`."""
    entity = get_upload(ctx, ctx.param("upload"))
    groups: dict[str, list[dict[str, Any]]] = {"asked": [], "in_progress": [], "passed": [], "failed": []}
    where = {JobStatus.WAITING: "asked", JobStatus.PROGRESS: "in_progress", JobStatus.SUCCESS: "passed",
             JobStatus.FAILURE: "failed", JobStatus.ABORTED: "failed"}
    for check in ctx.wh.entities.find(CHECK, "json_extract(body, '$.upload._id') = ?", (entity.id,)):
        if check.body.get("round") == entity.body.get("round"):
            groups[where[check.body["status"]]].append(check_execution_view(check))
    return json_response(groups)


async def _ensure(ctx: Ctx, upload_id: str) -> str:
    get_upload(ctx, upload_id)
    return KIND


def routes() -> list[BaseRoute]:
    item = PREFIX + "/{upload}"
    return [
        Route(PREFIX, list_uploads, methods=["GET"]),
        Route(PREFIX, create_upload, methods=["POST"]),
        Route(item, get_upload_route, methods=["GET"]),
        Route(item, edit_upload, methods=["PATCH"]),
        Route(item, delete_upload, methods=["DELETE"]),
        Route(item + "/data", push_data, methods=["POST"]),
        Route(item + "/data", delete_data, methods=["DELETE"]),
        Route(item + "/md5", push_md5, methods=["POST"]),
        Route(item + "/md5", delete_md5, methods=["DELETE"]),
        Route(item + "/tree", tree, methods=["GET"]),
        Route(item + "/close", close, methods=["POST"]),
        Route(item + "/open", reopen, methods=["POST"]),
        Route(item + "/checks", upload_checks, methods=["GET"]),
        *annotation_routes(PREFIX, "upload", _ensure),
    ]


