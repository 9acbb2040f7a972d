"""What a processing execution does, in a worker process: the writer builds the output pyramid
from the inputs (georeferenced images of uploads, an input pyramid to update by reference, or a
WMS to harvest), or the vector integration writes (or changes) a base from a VECTOR upload; either
returns the stored data's summary.

This is the one place that calls the writer (`build`, `update` by reference, `harvest`) and the
vector integration (`vector/integrate.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings

from .checks import IMAGE_EXTENSIONS, extent_polygon, vector_data
from .entities import Entities, Entity
from .processings import find, flag
from .pyramid_home import output_of
from .upload_files import upload_files


class ExecutionError(Exception):
    """The execution cannot run (inputs gone…): its message ends up in the logs."""


def _sources(settings: Settings, entities: Entities, upload_ids: list[str],
             stack: contextlib.ExitStack) -> tuple[list[str], dict[str, str], str | None]:
    """Image files of the input uploads, local for the time of `stack` (S3 uploads are copied),
    and the origins of the copies, which name them in the writer's fingerprint."""
    files, origins, srs = [], {}, None
    for upload_id in upload_ids:
        upload = entities.get("upload", upload_id)
        if upload is None:
            raise ExecutionError(f"input upload {upload_id} no longer exists")
        srs = srs or upload.body.get("srs")
        root = stack.enter_context(upload_files(settings, upload_id).local())
        files += [str(f) for rel, f in root.files("data") if rel.lower().endswith(IMAGE_EXTENSIONS)]
        origins.update(root.origins)
    return files, origins, srs


def _level(value: Any) -> str | None:
    return None if value is None else str(value)


def _parallelization(parameters: dict[str, Any]) -> int:
    return max(1, min(int(parameters.get("parallelization", 1)), os.cpu_count() or 1))


def shardable(settings: Settings, execution: Entity) -> bool:
    """Whether the execution is an image pyramid build (no input pyramid, no harvest), which the
    writer can split into shards of its bottom level."""
    processing = find(settings.tms_directory, execution.body["processing"]["_id"])
    return processing is not None and processing.key == "build" and \
        not execution.body.get("inputs", {}).get("stored_data")


def run_execution(settings: Settings, store: PublicationStore, entities: Entities, execution: Entity,
                  descriptor_url: str, **sharding: Any) -> dict[str, Any]:
    """Run the writer for an execution, writing the pyramid whose descriptor is `descriptor_url`
    (on disk or S3); the summary of the pyramid written. `shard=(K, N)` computes share K of the
    bottom level of a `shardable` build only, `finish=N` the rest once the N shards are done."""
    with contextlib.ExitStack() as stack:
        return _run(settings, store, entities, execution, descriptor_url, stack, sharding)


def _run(settings: Settings, store: PublicationStore, entities: Entities, execution: Entity,
         descriptor_url: str, stack: contextlib.ExitStack, sharding: dict[str, Any]) -> dict[str, Any]:
    from tileserver.writer.build import build_async, run_with_storage
    from tileserver.writer.options import BuildOptions
    from tileserver.writer.progress import Progress

    body = execution.body
    processing = find(settings.tms_directory, body["processing"]["_id"])
    if processing is None:
        raise ExecutionError(f"unknown processing {body['processing']['_id']}")
    if processing.key == "vector":
        return _integrate(settings, entities, execution, descriptor_url, stack)
    parameters = body.get("parameters", {})
    output_dir, name = output_of(descriptor_url)
    progress = Progress(tty=False, interval=2.0)
    inputs = body.get("inputs", {})
    ancestors = [store.get_stored_data(s["_id"]) for s in inputs.get("stored_data", [])]
    if any(a is None for a in ancestors):
        raise ExecutionError("an input stored data no longer exists")
    if processing.key == "vector-pyramid":
        base = next(a for a in ancestors if a is not None and a.type == "VECTOR-DB")
        updated = next((a for a in ancestors if a is not None and a.type == "ROK4-PYRAMID-VECTOR"), None)
        return _vector_pyramid(settings, base, parameters, output_dir, name, updated)
    common = {"tms": parameters.get("tms") or "PM", "bottom": _level(parameters.get("bottom")),
              "top": _level(parameters.get("top")), "compression": parameters.get("compression", "raw"),
              "width": int(parameters.get("width", 16)), "height": int(parameters.get("height", 16)),
              "mask": flag(parameters.get("mask", False)), "parallelization": _parallelization(parameters)}

    if processing.key == "harvest":
        from tileserver.outbound import OutboundPolicy
        from tileserver.writer.harvest import HarvestOptions, harvest_async

        harvest = HarvestOptions.from_text(
            url=parameters["harvest_url"], layers=parameters["harvest_layers"], format=parameters["harvest_format"],
            area=parameters["harvest_area"], levels=",".join(parameters["harvest_levels"]),
            dimensions=",".join(map(str, parameters["harvest_dimensions"])) if parameters.get("harvest_dimensions")
            else None, extras=parameters.get("harvest_extras", ""), threshold=parameters.get("harvest_threshold", 0),
            style="", outbound=OutboundPolicy.from_settings(settings))  # the URL is an /api user's
        nodata = parameters.get("nodata")
        options = BuildOptions(**common, samplesperpixel=parameters.get("samplesperpixel"),
                               sampleformat=parameters.get("sampleformat"),
                               nodata=tuple(float(v) for v in nodata) if nodata else None)
        return run_with_storage(settings, lambda storage, s: harvest_async(
            harvest, output_dir, name, options, storage, tms_directory=s.tms_directory, overwrite=True,
            progress=progress))

    sources, origins, srs = _sources(settings, entities, [u["_id"] for u in inputs.get("upload", [])], stack)
    if not sources:
        raise ExecutionError("the input uploads hold no image")
    if ancestors:
        from tileserver.writer.update import UpdateOptions, update_async

        ancestor = ancestors[0]
        assert ancestor is not None
        update = UpdateOptions(interpolation=parameters.get("interpolation"),
                               parallelization=common["parallelization"], srs=srs)
        return run_with_storage(settings, lambda storage, s: update_async(
            ancestor.descriptor_url, sources, output_dir, name, update, storage, tms_directory=s.tms_directory,
            overwrite=True, progress=progress, origins=origins))
    options = BuildOptions(**common, interpolation=parameters.get("interpolation", "bicubic"), srs=srs)
    return run_with_storage(settings, lambda storage, s: build_async(
        sources, output_dir, name, options, storage, tms_directory=s.tms_directory, overwrite=True,
        progress=progress, origins=origins, **sharding))


# --- vector bases --------------------------------------------------------------------------------

# PostgreSQL's names for the base's attribute types, as the platform's relations show them
_SQL_TYPES = {"integer": "integer", "real": "double precision", "string": "character varying",
              "boolean": "boolean", "date": "date", "datetime": "timestamp with time zone", "binary": "bytea"}


def relation_view(relation: Any) -> dict[str, Any]:
    """A base table as the platform's `type_infos.relations[]` item (attributes: name → type)."""
    attributes: dict[str, str] = {}
    for key in relation.primary_key:
        attributes[key] = "integer"
    if relation.geometry_column:
        epsg = relation.srs.split(":")[-1] if relation.srs.upper().startswith("EPSG:") else "0"
        attributes[relation.geometry_column] = f"geometry({relation.geometry_type or 'Geometry'},{epsg})"
    for attribute in relation.attributes:
        attributes[attribute.name] = _SQL_TYPES.get(attribute.type, "character varying")
    return {"name": relation.name, "type": relation.type, "attributes": attributes,
            "primary_key": list(relation.primary_key)}


def base_summary(integration: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"srs": integration.srs, "size": integration.size,
                           "type_infos": {"relations": [relation_view(r) for r in integration.relations]}}
    if integration.extent is not None:
        out["extent"] = extent_polygon(*integration.extent)
    return out


def _integrate(settings: Settings, entities: Entities, execution: Entity, base_url: str,
               stack: contextlib.ExitStack) -> dict[str, Any]:
    """Check the delivered files again and write a new base at `base_url`, or apply them to the
    existing one. Every feature is read by the check: from headers alone, a CSV's geometry type is
    "Unknown" and its table would be written without geometries."""
    import dataclasses
    import logging
    import tempfile

    from tileserver.catalog import open_vector_base
    from tileserver.vector import pgintegrate, postgis
    from tileserver.vector.delivery import check_delivery
    from tileserver.vector.integrate import IntegrationError, apply_changes, integrate

    from .pyramid_home import base_path

    log = logging.getLogger("tileserver.warehouse")
    body = execution.body
    parameters = body.get("parameters", {})
    files, names, srs = [], [], None
    for ref in body.get("inputs", {}).get("upload", []):
        upload = entities.get("upload", ref["_id"])
        if upload is None:
            raise ExecutionError(f"input upload {ref['_id']} no longer exists")
        srs = srs or upload.body.get("srs")
        root = stack.enter_context(upload_files(settings, upload.id).local())
        for rel, path in vector_data(root):
            files.append(path)
            names.append(rel)
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vector-integration-"))
    report = check_delivery(files, srs, workdir, names=names)
    if not report.ok:
        raise ExecutionError("the delivery cannot be read: " + "; ".join(report.problems))
    on_postgis = postgis.is_postgis(base_url)
    postgis.configure(settings.vector_db_url)
    target = base_path(base_url)
    existing = bool(body["output"]["stored_data"].get("existing"))
    try:
        if not existing:
            log.info("integrating %d layer(s) into a new base%s%s", len(report.layers),
                     f" reprojected to {parameters['srs']}" if parameters.get("srs") else "",
                     " (PostGIS)" if on_postgis else "")
            if on_postgis:
                result = pgintegrate.integrate(report, base_url, srs=parameters.get("srs"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                result = integrate(report, target, srs=parameters.get("srs"))
        else:
            base = open_vector_base(base_url)
            try:
                tables = {r.name for r in base.relations()}
            finally:
                base.close()
            role = "update" if parameters.get("update") is True else "delete" if parameters.get("delete") is True \
                else None
            if role is not None:  # delivered tables the base has are changed rather than added
                report.layers = [dataclasses.replace(layer, role=role)
                                 if layer.role == "load" and layer.table in tables else layer
                                 for layer in report.layers]
            for layer in report.layers:
                log.info("%s: %s table %s", layer.source, {"load": "new", "update": "updates", "delete":
                                                           "deletes from"}[layer.role], layer.table)
            result = pgintegrate.apply_changes(report, base_url) if on_postgis else apply_changes(report, target)
    except IntegrationError as exc:
        raise ExecutionError(str(exc)) from None
    for relation in result.relations:
        log.info("table %s: %d feature(s), %s, %s", relation.name, relation.count,
                 relation.geometry_type or "no geometry", relation.srs)
    return base_summary(result)


def _vector_pyramid(settings: Settings, base: Any, parameters: dict[str, Any], output_dir: str,
                    name: str, updated: Any = None) -> dict[str, Any]:
    """tippecanoe over the input base's tables, packed into a ROK4 vector pyramid (descriptor last);
    with `updated` (an input vector pyramid), a new pyramid that recomputes the composition there
    and links the rest to it (its grid and slab size unless the parameters name them)."""
    import logging

    from tileserver.catalog import open_vector_base
    from tileserver.vector import postgis
    from tileserver.writer.build import run_with_storage
    from tileserver.writer.errors import WriterError
    from tileserver.writer.vector_pyramid import build_vector_pyramid_async, options_from_parameters

    from .pyramid_home import base_path

    log = logging.getLogger("tileserver.warehouse")
    postgis.configure(settings.vector_db_url)
    path: Any = base.descriptor_url if postgis.is_postgis(base.descriptor_url) else base_path(base.descriptor_url)
    try:
        source = open_vector_base(base.descriptor_url)
    except (OSError, ValueError):
        raise ExecutionError(f"the input base {base.name} cannot be read") from None
    try:
        options = options_from_parameters(parameters, source.relations())
    except WriterError as exc:
        raise ExecutionError(str(exc)) from None
    finally:
        source.close()
    options = dataclasses.replace(options, parallelization=_parallelization(parameters))
    if updated is None:
        return run_with_storage(settings, lambda storage, s: build_vector_pyramid_async(
            path, output_dir, name, options, storage, tms_directory=s.tms_directory, overwrite=True, emit=log.info))

    async def update(storage: Any, s: Settings) -> dict[str, Any]:
        from tileserver.pyramid import Pyramid, PyramidError
        from tileserver.storage import StorageError

        try:
            old = (await Pyramid.open(updated.descriptor_url, storage, tms_directory=s.tms_directory)).descriptor
        except (PyramidError, StorageError) as exc:
            raise ExecutionError(f"the pyramid to update ({updated.name}) cannot be read: {exc}") from None
        first = old.levels[0]
        given = dataclasses.replace(options, tms=parameters.get("tms") or old.tile_matrix_set,
                                    width=int(parameters.get("width", first.tiles_per_width)),
                                    height=int(parameters.get("height", first.tiles_per_height)))
        log.info("update of the vector pyramid %s (%s)", updated.name, updated.id)
        return await build_vector_pyramid_async(path, output_dir, name, given, storage, tms_directory=s.tms_directory,
                                                overwrite=True, emit=log.info, update=updated.descriptor_url)

    return run_with_storage(settings, update)
