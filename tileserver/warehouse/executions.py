"""Processings and their executions: list the definitions; create an execution (validated against
its processing, every problem listed; the output stored data created at once), launch it
(WAITING → PROGRESS → SUCCESS | FAILURE, run by the scheduler's worker processes), abort it,
read its logs.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.status import FINAL, RUNNING, StoredDataStatus, UploadStatus
from tileserver.rok4.tms import TMSError, load_tms

from . import estimate, lifecycle
from .annotations import add_event, annotations_view
from .check_routes import logs_response
from .entities import Entity
from .errors import bad_request, conflict, not_found
from .lifecycle import EXECUTION
from .processings import PYRAMID_VECTOR, VECTOR_DB, Processing, check_parameters, find, processings
from .pyramid_home import base_url
from .stored_data import KIND as STORED_DATA
from .stored_data import get_stored, summary_view
from .uploads import get_upload
from .usage import PYRAMIDS, room
from .web import Ctx, json_body, json_response, list_response, no_content, route

PREFIX = "/api/datastores/{datastore}/processings"


def _processings(ctx: Ctx) -> tuple[Processing, ...]:
    return processings(ctx.wh.settings.tms_directory)


@route
async def list_processings(ctx: Ctx) -> Response:
    return list_response(ctx.request, [p.view() for p in _processings(ctx)])


@route
async def get_processing(ctx: Ctx) -> Response:
    processing = find(ctx.wh.settings.tms_directory, ctx.param("processing"))
    if processing is None:
        raise not_found("processing", ctx.param("processing"))
    return json_response(processing.view())


# --- views -----------------------------------------------------------------------------------------


def execution_view(ctx: Ctx, entity: Entity) -> dict[str, Any]:
    body = entity.body
    uploads = []
    for ref in body["inputs"].get("upload", []):
        upload = ctx.wh.entities.get("upload", ref["_id"])
        uploads.append({"_id": ref["_id"], **({k: upload.body.get(k) for k in ("type", "name", "status", "srs")}
                                              if upload else {"name": ref.get("name"), "status": UploadStatus.DELETED})})
    inputs_sd = []
    for ref in body["inputs"].get("stored_data", []):
        stored = ctx.wh.store.get_stored_data(ref["_id"])
        inputs_sd.append(summary_view(stored) if stored else {**ref, "status": StoredDataStatus.DELETED})
    output = body["output"]["stored_data"]
    stored = ctx.wh.store.get_stored_data(output["_id"])
    out = {
        "_id": entity.id,
        "processing": body["processing"],
        "status": body["status"],
        "creation": entity.created_at,
        "inputs": {"upload": uploads, "stored_data": inputs_sd},
        "output": {"stored_data": summary_view(stored) if stored else {**output, "status": StoredDataStatus.DELETED}},
        "parameters": body["parameters"],
        **annotations_view(body),
    }
    for key in ("launch", "start", "finish"):
        if body.get(key):
            out[key] = body[key]
    return out


def _ref_filter(section: str, kind: str):  # noqa: ANN202 - a web.Filter
    def match(item: dict[str, Any], wanted: str) -> bool:
        holder = item[section]
        refs = holder.get(kind) if isinstance(holder, dict) else None
        refs = refs if isinstance(refs, list) else [refs] if refs else []
        return any(r.get("_id") == wanted.lower() for r in refs)

    return match


FILTERS = {
    "input_upload": _ref_filter("inputs", "upload"),
    "input_stored_data": _ref_filter("inputs", "stored_data"),
    "output_stored_data": _ref_filter("output", "stored_data"),
    "output_upload": lambda item, wanted: False,  # this warehouse's processings only make stored data
}


def get_execution(ctx: Ctx) -> Entity:
    entity = ctx.wh.entities.get(EXECUTION, ctx.param("execution").lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("processing execution", ctx.param("execution"))
    return entity


@route
async def list_executions(ctx: Ctx) -> Response:
    entities = await asyncio.to_thread(ctx.wh.entities.list, EXECUTION, ctx.datastore.id)
    return list_response(ctx.request, [execution_view(ctx, e) for e in entities], FILTERS)


@route
async def get_execution_route(ctx: Ctx) -> Response:
    return json_response(execution_view(ctx, get_execution(ctx)))


# --- creation ---------------------------------------------------------------------------------------


def _ids(value: Any, where: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where}: must be an array of identifiers")
        return []
    return [v.lower() for v in value]


def _check_uploads(ctx: Ctx, processing: Processing, ids: list[str], problems: list[str]) -> list[Entity]:
    if not processing.upload_types and ids:
        problems.append(f"inputs.upload: processing '{processing.name}' takes no upload")
        return []
    if processing.upload_types and not ids:
        problems.append(f"inputs.upload: processing '{processing.name}' needs at least one upload of type "
                        f"{' or '.join(processing.upload_types)}")
    found = []
    for i, ident in enumerate(ids):
        where = f"inputs.upload[{i}]"
        try:
            upload = get_upload(ctx, ident)
        except Exception:
            problems.append(f"{where}: upload {ident} not found in this datastore")
            continue
        if upload.body["type"] not in processing.upload_types:
            problems.append(f"{where}: upload {ident} is of type {upload.body['type']}, expected "
                            f"{' or '.join(processing.upload_types)}")
        if upload.body["status"] != UploadStatus.CLOSED:
            problems.append(f"{where}: upload {ident} is {upload.body['status']}; it must be CLOSED (checks passed)")
        found.append(upload)
    return found


def _check_stored(ctx: Ctx, processing: Processing, ids: list[str], problems: list[str]) -> list[Any]:
    if len(ids) > (2 if processing.key == "vector-pyramid" else 1):
        problems.append("inputs.stored_data: at most one pyramid to update"
                        + (" and one VECTOR-DB base" if processing.key == "vector-pyramid" else ""))
    found = []
    for i, ident in enumerate(ids):
        where = f"inputs.stored_data[{i}]"
        try:
            stored, _ = get_stored(ctx, ident)
        except Exception:
            problems.append(f"{where}: stored data {ident} not found in this datastore")
            continue
        if stored.type not in processing.stored_data_types:
            problems.append(f"{where}: stored data {ident} is of type {stored.type}")
        elif stored.status != StoredDataStatus.GENERATED:
            problems.append(f"{where}: stored data {ident} is {stored.status}; it must be GENERATED")
        found.append(stored)
    if found and processing.key == "harvest":
        problems.append("inputs.stored_data: updating a pyramid by harvesting is not supported here")
    if processing.key == "vector-pyramid":
        kinds = [s.type for s in found]
        if found and kinds.count(VECTOR_DB) != 1:
            problems.append("inputs.stored_data: one VECTOR-DB base to compute the pyramid from is required")
        if kinds.count(PYRAMID_VECTOR) > 1:
            problems.append("inputs.stored_data: at most one ROK4-PYRAMID-VECTOR to update")
    return found


def _check_levels(ctx: Ctx, parameters: dict[str, Any], ancestors: list[Any], problems: list[str]) -> Any:
    """Level ids exist in the grid: the given `tms`, else the updated pyramid's. Returns the grid."""
    tms_id = parameters.get("tms")
    if tms_id is None and ancestors:
        tms_id = ancestors[0].summary.get("type_infos", {}).get("tms") or ancestors[0].summary.get("tile_matrix_set")
    if tms_id is None:
        if any(k in parameters for k in ("bottom", "top", "harvest_levels")) or not ancestors:
            problems.append("parameters.tms: mandatory for an initial generation")
        return None
    if not isinstance(tms_id, str):
        return None
    try:
        tms = load_tms(tms_id, ctx.wh.settings.tms_directory)
    except (TMSError, ValueError, OSError):
        problems.append(f"parameters.tms: unknown tile matrix set {tms_id}")
        return None
    levels = [m.id for m in tms.matrices]
    named: list[tuple[str, Any]] = [(k, parameters[k]) for k in ("bottom", "top") if k in parameters]
    named += [(f"harvest_levels[{i}]", v) for i, v in enumerate(parameters.get("harvest_levels") or [])]
    for key, value in named:
        if isinstance(value, str | int) and not isinstance(value, bool) and tms.get(str(value)) is None:
            problems.append(f"parameters.{key}: level {value} is not in grid {tms_id}"
                            + (f" (levels {levels[0]}…{levels[-1]})" if levels else ""))
    bottom, top = tms.get(str(parameters.get("bottom", ""))), tms.get(str(parameters.get("top", "")))
    if bottom is not None and top is not None and bottom.cell_size > top.cell_size:
        problems.append(f"parameters.top: level {parameters['top']} is finer than the bottom level {parameters['bottom']}")
    return tms


def _estimate(ctx: Ctx, processing: Processing, parameters: dict[str, Any], uploads: list[Entity], tms: Any,
              problems: list[str]) -> int:
    """Bytes the output will take (0 when unknown); adds an oversampled bottom level to `problems`."""
    if processing.key == "harvest":
        area = parameters.get("harvest_area")
        source = estimate.source_of_area(area) if isinstance(area, str) else None
        channels = parameters.get("samplesperpixel") or 3
        sample_bytes = 4 if parameters.get("sampleformat") == "FLOAT32" else 1
    else:
        source = estimate.source_of_uploads([u.body for u in uploads])
        channels, sample_bytes = 3, 1
    if tms is None:
        return 0
    bottom, top = tms.get(str(parameters.get("bottom", ""))), tms.get(str(parameters.get("top", "")))
    if processing.key != "harvest":
        problems += estimate.bottom_problems(tms, bottom, source)
    levels = estimate.levels_built(tms, bottom, top, source)
    return estimate.output_bytes(tms, levels, source, int(channels), sample_bytes,
                                 str(parameters.get("compression", "raw")))


async def _harvest_problems(ctx: Ctx, parameters: dict[str, Any]) -> list[str]:
    """What the writer would refuse later: the area's WKT and the WMS URL, which must be a host the
    outbound policy allows (checked on its addresses now; a name that does not resolve yet is
    accepted, since the worker checks every connection again)."""
    from tileserver.outbound import OutboundPolicy, OutboundRefused
    from tileserver.writer.errors import WriterError
    from tileserver.writer.harvest import parse_wkt_polygons

    problems = []
    area = parameters.get("harvest_area")
    if isinstance(area, str):
        try:
            parse_wkt_polygons(area)
        except (WriterError, ValueError) as exc:
            problems.append(f"parameters.harvest_area: {exc}")
    url = parameters.get("harvest_url")
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        problems.append("parameters.harvest_url: an http(s) URL is required")
    elif isinstance(url, str):
        try:
            await OutboundPolicy.from_settings(ctx.wh.settings).check_resolved(url)
        except OutboundRefused as exc:
            problems.append(f"parameters.harvest_url: {exc}")
    return problems


def _check_output(data: dict[str, Any], problems: list[str], allow_id: bool = False) -> dict[str, Any]:
    """`output.stored_data`: the new stored data's name (or, when `allow_id`, the id of one to change)."""
    output = data.get("output")
    stored = output.get("stored_data") if isinstance(output, dict) else None
    if allow_id and isinstance(stored, dict) and "id" in stored:
        return stored
    if isinstance(stored, dict) and "id" in stored:
        problems.append("output.stored_data.id: this processing makes a new stored data; give its name")
        return {}
    if not isinstance(stored, dict) or not isinstance(stored.get("name"), str) or not stored["name"].strip():
        problems.append("output.stored_data.name: the name of the stored data to create is required")
        return {}
    tags = stored.get("storage_tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append("output.stored_data.storage_tags: must be an array of strings")
    return stored


def _vector_problems(ctx: Ctx, parameters: dict[str, Any], uploads: list[Entity], output: dict[str, Any],
                     problems: list[str]) -> Any:
    """An integration: its target CRS, and the existing base it updates (returned) when
    `output.stored_data.id` names one."""
    srs = parameters.get("srs")
    if isinstance(srs, str):
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(srs)
        except CRSError:
            problems.append(f"parameters.srs: unknown coordinate reference system {srs!r}")
    if len({u.body.get("srs") for u in uploads}) > 1:
        problems.append("inputs.upload: the uploads declare different srs; integrate them one at a time")
    ident = output.get("id")
    changes = [k for k in ("update", "delete") if parameters.get(k) is True]
    if ident is None:
        problems += [f"parameters.{k}: needs output.stored_data.id, the base to change" for k in changes]
        return None
    if not isinstance(ident, str):
        problems.append("output.stored_data.id: a stored data identifier is required")
        return None
    if "srs" in parameters:
        problems.append("parameters.srs: only for a new base (an existing base keeps its CRS)")
    try:
        stored, _ = get_stored(ctx, ident)
    except Exception:
        problems.append(f"output.stored_data.id: stored data {ident} not found in this datastore")
        return None
    if stored.type != VECTOR_DB:
        problems.append(f"output.stored_data.id: stored data {ident} is of type {stored.type}, not {VECTOR_DB}")
    elif stored.status != StoredDataStatus.GENERATED:
        problems.append(f"output.stored_data.id: stored data {ident} is {stored.status}; it must be GENERATED")
    elif _outputs_of_running(ctx, stored.id):
        problems.append(f"output.stored_data.id: stored data {ident} is already being changed by a processing"
                        " execution")
    return stored


def _outputs_of_running(ctx: Ctx, stored_id: str) -> list[Entity]:
    return [e for e in ctx.wh.entities.find(EXECUTION, "json_extract(body, '$.status') IN ('CREATED', 'WAITING',"
                                                      " 'PROGRESS') AND json_extract(body, '$.output.stored_data._id')"
                                                      " = ?", (stored_id,))]


def _vector_pyramid_problems(ctx: Ctx, parameters: dict[str, Any], stored: Any, updated: Any = None) -> list[str]:
    """What the vector pyramid's run would refuse before writing: composition against the base
    (tables, attributes, filters, levels), tippecanoe options, area, grid (an update's is the
    updated pyramid's)."""
    import sqlite3

    from tileserver.catalog import open_vector_base
    from tileserver.writer.errors import WriterError
    from tileserver.writer.vector_pyramid import check_options, options_from_parameters

    try:
        base = open_vector_base(stored.descriptor_url)
    except (OSError, ValueError, sqlite3.Error):
        return [f"inputs.stored_data[0]: the base of stored data {stored.id} cannot be read"]
    grid = str(parameters.get("tms") or "PM")
    if updated is not None:
        ancestor_grid = str((updated.summary.get("type_infos") or {}).get("tms") or "PM")
        if "tms" in parameters and parameters["tms"] != ancestor_grid:
            return [f"parameters.tms: the pyramid to update ({updated.id}) is on grid {ancestor_grid},"
                    f" not {parameters['tms']}"]
        grid = ancestor_grid
    try:
        tms = load_tms(grid, ctx.wh.settings.tms_directory)
        check_options(base, tms, options_from_parameters(parameters, base.relations()))
    except WriterError as exc:
        return [str(exc)]
    except (TMSError, ValueError, OSError) as exc:
        return [f"parameters: {exc}"]
    finally:
        base.close()
    return []


VECTOR_GROWTH = 2  # a base's bytes per delivered byte, at most (GeoPackage with R-trees vs shapefiles/CSV)


@route
async def create_execution(ctx: Ctx) -> Response:
    data = await json_body(ctx.request)
    problems: list[str] = [f"{k}: unknown field" for k in sorted(set(data) - {"processing", "inputs", "output",
                                                                             "parameters"})]
    ident = data.get("processing")
    processing = find(ctx.wh.settings.tms_directory, ident) if isinstance(ident, str) else None
    if processing is None:
        raise bad_request(*problems, f"processing: unknown processing {ident!r} (GET …/processings lists them)")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict):
        problems.append("inputs: must be an object {upload: [...], stored_data: [...]}")
        inputs = {}
    problems += [f"inputs.{k}: unknown input type" for k in inputs if k not in ("upload", "stored_data")]
    uploads = _check_uploads(ctx, processing, _ids(inputs.get("upload"), "inputs.upload", problems), problems)
    ancestors = _check_stored(ctx, processing, _ids(inputs.get("stored_data"), "inputs.stored_data", problems),
                              problems)
    parameters, parameter_problems = check_parameters(processing, data.get("parameters"))
    problems += parameter_problems
    vector = processing.key == "vector"
    existing = None
    tms = None
    if vector:
        output = _check_output(data, problems, allow_id=True)
        existing = await asyncio.to_thread(_vector_problems, ctx, parameters, uploads, output, problems)
    elif processing.key == "vector-pyramid":
        problems += estimate.slab_problems(parameters)
        bases = [s for s in ancestors if s.type == VECTOR_DB]
        updated = next((s for s in ancestors if s.type == PYRAMID_VECTOR), None)
        if not inputs.get("stored_data"):
            problems.append("inputs.stored_data: the VECTOR-DB base to compute the pyramid from is required")
        elif len(bases) == 1 and isinstance(data.get("parameters"), dict):
            problems += await asyncio.to_thread(_vector_pyramid_problems, ctx, parameters, bases[0], updated)
        output = _check_output(data, problems)
    else:
        problems += estimate.slab_problems(parameters)
        if isinstance(data.get("parameters"), dict):
            tms = await asyncio.to_thread(_check_levels, ctx, parameters, ancestors, problems)
        if processing.key == "harvest":
            problems += await _harvest_problems(ctx, parameters)
        output = _check_output(data, problems)
    if problems:
        raise bad_request(*problems)
    if vector:
        size = VECTOR_GROWTH * sum(int(u.body.get("size", 0)) for u in uploads)
    elif processing.key == "vector-pyramid":  # tiles hold no more than the base (generalised, no index)
        size = sum(int(s.summary.get("size", 0) or 0) for s in ancestors if s.type == VECTOR_DB)
    else:
        size = await asyncio.to_thread(_estimate, ctx, processing, parameters, uploads, tms, problems)
    if problems:
        raise bad_request(*problems)
    free = await asyncio.to_thread(room, ctx.wh.store, ctx.datastore, PYRAMIDS)
    if size > free:
        what = "base" if vector else "pyramid"
        raise bad_request(f"quota exceeded: the output {what} is estimated at {size} bytes, the datastore's"
                          f" {'stored data' if vector else 'pyramids'} may take {max(free, 0)} more bytes (quota {ctx.datastore.quota});"
                          + (" deliver less data" if vector else " choose a coarser bottom level")
                          + " or free some room")

    if existing is not None:
        stored_id, stored_name = existing.id, existing.name
    else:
        side: dict[str, Any] = {"tags": {}, "storage_tags": list(output.get("storage_tags", [])),
                                "contact": ctx.user.email}
        add_event(side, "Création", ctx.user)
        url = base_url(ctx.wh.settings, str(uuid.uuid4())) if vector else ctx.wh.pyramid_url(str(uuid.uuid4()))
        stored = await asyncio.to_thread(lifecycle.new_output, ctx.wh.store, url, output["name"], processing.output)
        stored_id, stored_name = stored.id, stored.name
        await asyncio.to_thread(ctx.wh.entities.create, STORED_DATA, ctx.datastore.id, side, stored_id)
    body: dict[str, Any] = {
        "processing": processing.summary_view(),
        "inputs": {"upload": [{"_id": u.id, "name": u.body["name"]} for u in uploads],
                   "stored_data": [{"_id": s.id, "name": s.name} for s in ancestors]},
        "output": {"stored_data": {"_id": stored_id, "name": stored_name,
                                   **({"existing": True} if existing is not None else {})}},
        "parameters": parameters,
        "estimate": size,
        "tags": {},
    }
    add_event(body, "Création", ctx.user)
    entity = await asyncio.to_thread(lifecycle.create, ctx.wh.entities, EXECUTION, ctx.datastore.id, body)
    return json_response(execution_view(ctx, entity), status=201)


# --- life ---------------------------------------------------------------------------------------------


@route
async def launch(ctx: Ctx) -> Response:
    entity = get_execution(ctx)
    updated, launched = await asyncio.to_thread(lifecycle.launch, ctx.wh.store, ctx.wh.entities, entity,
                                                ctx.datastore)
    if not launched:
        raise conflict(f"processing execution {entity.id} is {updated.body['status']}: only a CREATED execution"
                       " can be launched")
    ctx.wh.wake()
    return json_response(execution_view(ctx, updated))


@route
async def abort(ctx: Ctx) -> Response:
    entity = get_execution(ctx)
    updated, previous = await asyncio.to_thread(lifecycle.abort, ctx.wh.store, ctx.wh.entities, entity, ctx.user.id,
                                                ctx.wh.settings)
    if previous in FINAL:
        raise conflict(f"processing execution {entity.id} already ended ({previous})")
    return json_response(execution_view(ctx, updated))


@route
async def delete_execution(ctx: Ctx) -> Response:
    entity = get_execution(ctx)
    if entity.body["status"] in RUNNING:
        raise conflict(f"processing execution {entity.id} is {entity.body['status']}: abort it first")
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    return no_content()


@route
async def execution_logs(ctx: Ctx) -> Response:
    return await logs_response(ctx, get_execution(ctx).id)


def routes() -> list[BaseRoute]:
    item = PREFIX + "/executions/{execution}"
    return [
        Route(PREFIX, list_processings, methods=["GET"]),
        Route(PREFIX + "/executions", list_executions, methods=["GET"]),
        Route(PREFIX + "/executions", create_execution, methods=["POST"]),
        Route(item, get_execution_route, methods=["GET"]),
        Route(item, delete_execution, methods=["DELETE"]),
        Route(item + "/launch", launch, methods=["POST"]),
        Route(item + "/abort", abort, methods=["POST"]),
        Route(item + "/logs", execution_logs, methods=["GET"]),
        Route(PREFIX + "/{processing}", get_processing, methods=["GET"]),
    ]
