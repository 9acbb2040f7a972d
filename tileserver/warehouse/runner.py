"""What a processing execution does, in a worker process: the writer builds the output pyramid
from the inputs (georeferenced images of uploads, an input pyramid to update by reference, or a
WMS to harvest) and returns the stored data's summary.

This is the one place that calls the writer: `build`, `update` (by reference) and `harvest`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings

from .checks import IMAGE_EXTENSIONS
from .entities import Entities, Entity
from .processings import find, flag
from .pyramid_home import output_of
from .upload_files import upload_files


class ExecutionError(Exception):
    """The execution cannot run (inputs gone…): its message ends up in the logs."""


def _sources(settings: Settings, entities: Entities, upload_ids: list[str],
             stack: contextlib.ExitStack) -> tuple[list[str], str | None]:
    """Image files of the input uploads, local for the time of `stack` (S3 uploads are copied)."""
    files, srs = [], None
    for upload_id in upload_ids:
        upload = entities.get("upload", upload_id)
        if upload is None:
            raise ExecutionError(f"input upload {upload_id} no longer exists")
        srs = srs or upload.body.get("srs")
        root = stack.enter_context(upload_files(settings, upload_id).local())
        files += [str(f) for rel, f in root.files("data") if rel.lower().endswith(IMAGE_EXTENSIONS)]
    return files, srs


def _level(value: Any) -> str | None:
    return None if value is None else str(value)


def _parallelization(parameters: dict[str, Any]) -> int:
    return max(1, min(int(parameters.get("parallelization", 1)), os.cpu_count() or 1))


def run_execution(settings: Settings, store: PublicationStore, entities: Entities, execution: Entity,
                  descriptor_url: str) -> dict[str, Any]:
    """Run the writer for an execution, writing the pyramid whose descriptor is `descriptor_url`
    (on disk or S3); the summary of the pyramid written."""
    with contextlib.ExitStack() as stack:
        return _run(settings, store, entities, execution, descriptor_url, stack)


def _run(settings: Settings, store: PublicationStore, entities: Entities, execution: Entity,
         descriptor_url: str, stack: contextlib.ExitStack) -> dict[str, Any]:
    from tileserver.writer.build import build_async, run_with_storage
    from tileserver.writer.options import BuildOptions
    from tileserver.writer.progress import Progress

    body = execution.body
    processing = find(settings.tms_directory, body["processing"]["_id"])
    if processing is None:
        raise ExecutionError(f"unknown processing {body['processing']['_id']}")
    parameters = body.get("parameters", {})
    output_dir, name = output_of(descriptor_url)
    progress = Progress(tty=False, interval=2.0)
    inputs = body.get("inputs", {})
    ancestors = [store.get_stored_data(s["_id"]) for s in inputs.get("stored_data", [])]
    if any(a is None for a in ancestors):
        raise ExecutionError("an input stored data no longer exists")
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

    sources, srs = _sources(settings, entities, [u["_id"] for u in inputs.get("upload", [])], stack)
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
            overwrite=True, progress=progress))
    options = BuildOptions(**common, interpolation=parameters.get("interpolation", "bicubic"), srs=srs)
    return run_with_storage(settings, lambda storage, s: build_async(
        sources, output_dir, name, options, storage, tms_directory=s.tms_directory, overwrite=True,
        progress=progress))
