"""One job in its own process: `python -m tileserver.warehouse.worker KIND ID`, settings as JSON
in `TILESERVER_WAREHOUSE_SETTINGS`.

The worker takes the job (WAITING → PROGRESS), beats every few seconds, streams its log lines
into the store, and ends it. It leads its own process group: when the job is aborted it kills the
group, the writer's pool processes included.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, fields
from typing import Any

from tileserver.publication.store import VECTOR_DB, PublicationStore
from tileserver.settings import S3Cluster, Settings

from . import lifecycle
from .accounts import Accounts
from .checks import BY_ID as CHECKS
from .checks import run_check
from .entities import Entities, Entity
from .pyramid_home import written_bytes
from .status import Status
from .upload_files import upload_files
from .usage import PYRAMIDS, room

SETTINGS_ENV = "TILESERVER_WAREHOUSE_SETTINGS"
BEAT_EVERY = 2.0  # seconds between heartbeats, or a quarter of the lease when that is shorter


def beat_every(settings: Settings) -> float:
    return max(0.1, min(BEAT_EVERY, settings.worker_lease / 4))


def settings_to_env(settings: Settings) -> str:
    return json.dumps(asdict(settings))


def settings_from_env(text: str) -> Settings:
    data = json.loads(text)
    data["s3_clusters"] = tuple(S3Cluster(**c) for c in data.get("s3_clusters", ()))
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in data.items() if k in known})


class StoreLog(logging.Handler):
    """Collects log lines (the job's own and the writer's progress) until the next flush."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, text: str) -> None:
        with self._guard:
            self.lines.append(lifecycle.log_line(text))

    def take(self) -> list[str]:
        with self._guard:
            lines, self.lines = self.lines, []
        return lines


class Worker:
    def __init__(self, settings: Settings, kind: str, job_id: str) -> None:
        self.settings = settings
        self.kind = kind
        self.job_id = job_id
        self.store = PublicationStore(settings.resolved_store_url)
        self.entities = Entities(self.store)
        self.log = StoreLog()
        self.done = threading.Event()
        self.output_url: str | None = None
        self.datastore_id: str | None = None
        self._measured = float("-inf")  # when an output on S3 was last listed

    def flush(self) -> None:
        self.entities.append_logs(self.job_id, self.log.take())

    def _beat(self) -> None:
        while not self.done.wait(beat_every(self.settings)):
            try:
                status = lifecycle.beat(self.entities, self.kind, self.job_id, os.getpid())
                if status == lifecycle.LOST:  # silent past the lease: requeued, another worker runs it
                    self.kill()
                self.flush()
                over = self.over_quota() if status == Status.PROGRESS and self._measure_now() else None
            except Exception:  # a busy store: try again at the next beat
                continue
            if status == Status.ABORTED:
                self.log.add("aborted")
                self.flush()
                self.kill()
            elif over is not None and not self.done.is_set():
                self.flush()
                if lifecycle.stop_running(self.entities, self.kind, self.job_id, over):
                    self.kill()

    def _measure_now(self) -> bool:
        """On disk the output is measured at every beat; on S3 measuring lists its objects, so at
        most every `warehouse_s3_measure_every` seconds."""
        if self.output_url is None or not self.output_url.startswith("s3://"):
            return True
        now = time.monotonic()
        if now - self._measured < self.settings.warehouse_s3_measure_every:
            return False
        self._measured = now
        return True

    def kill(self) -> None:
        """The writer's pool processes and this worker at once; the server's scheduler settles the
        rest (removes the partial output, frees the reservation) once this process is gone."""
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def over_quota(self, written: int | None = None) -> str | None:
        """Why this execution must stop: its output so far is past what the datastore may still
        take (its own reservation aside); None while it fits or cannot be measured."""
        if self.kind != lifecycle.EXECUTION or self.output_url is None or self.datastore_id is None:
            return None
        if written is None:
            written = written_bytes(self.output_url, self.settings)
        datastore = Accounts(self.store).get_datastore(self.datastore_id)  # the operator may change its quota
        if written is None or datastore is None:
            return None
        free = room(self.store, datastore, PYRAMIDS, except_holder=self.job_id)
        if written <= free:
            return None
        return (f"quota exceeded: the output pyramid reached {written} bytes, the datastore's pyramids may take"
                f" {max(free, 0)} more bytes (quota {datastore.quota}): execution stopped, partial output"
                " removed")

    def run(self) -> int:
        entity = lifecycle.begin(self.entities, self.kind, self.job_id, os.getpid())
        if entity is None:
            return 0
        logging.getLogger().addHandler(self.log)
        logging.getLogger().setLevel(logging.INFO)
        threading.Thread(target=self._beat, daemon=True).start()
        try:
            status, result = self._work(entity)
        except Exception as exc:
            self.log.add(f"error: {exc}")
            logging.getLogger("tileserver.warehouse").debug("%s", traceback.format_exc())
            status, result = Status.FAILURE, {}
        self.done.set()
        lifecycle.finish(self.store, self.entities, self.kind, self.job_id, status, self.settings, self.log.take(),
                         result, pid=os.getpid())
        return 0

    def _work(self, entity: Entity) -> tuple[str, dict[str, Any]]:
        if self.kind == lifecycle.CHECK:
            return self._check(entity)
        return self._execution(entity)

    def _check(self, entity: Entity) -> tuple[str, dict[str, Any]]:
        check = CHECKS[entity.body["check"]["_id"]]
        upload = self.entities.get("upload", entity.body["upload"]["_id"])
        if upload is None:
            self.log.add("the upload no longer exists")
            return Status.FAILURE, {}
        self.log.add(f"{check.name} of upload {upload.body.get('name')}")
        with upload_files(self.settings, upload.id).local() as files:
            ok, found = run_check(check, files, upload.body.get("srs", ""), self.log.add, self.settings)
        self.log.add("passed" if ok else "failed")
        return (Status.SUCCESS if ok else Status.FAILURE), found

    def _execution(self, entity: Entity) -> tuple[str, dict[str, Any]]:
        from .runner import run_execution

        output = entity.body["output"]["stored_data"]
        stored = self.store.get_stored_data(output["_id"])
        if stored is None:
            self.log.add("the output stored data no longer exists")
            return Status.FAILURE, {}
        existing = bool(output.get("existing"))  # a base being changed keeps its summary meanwhile
        self.store.put_stored_data(stored.descriptor_url, stored.summary if existing else {}, stored.name,
                                   "GENERATING", stored.type)
        self.datastore_id = entity.datastore_id
        if not existing:  # a base changed in place is measured once done, by its growth
            self.output_url = stored.descriptor_url
        what = "base" if stored.type == VECTOR_DB else "pyramid"
        self.log.add(f"{entity.body['processing']['name']}: output {what} {stored.descriptor_url}")
        summary = run_execution(self.settings, self.store, self.entities, entity, stored.descriptor_url)
        size = int(summary.get("size", 0) or 0)
        self.output_url = stored.descriptor_url
        over = self.over_quota(size - (int(stored.summary.get("size", 0) or 0) if existing else 0))
        if over is not None:  # finished between two beats: still refused
            self.log.add(over)
            return Status.FAILURE, {}
        if stored.type == VECTOR_DB:
            tables = [r["name"] for r in summary.get("type_infos", {}).get("relations", [])]
            self.log.add(f"base written: tables {', '.join(tables)}, {size} bytes")
        else:
            self.log.add(f"pyramid written: levels {', '.join(summary.get('type_infos', {}).get('levels', []))},"
                         f" {size} bytes")
        return Status.SUCCESS, {"summary": summary}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in lifecycle.JOB_KINDS:
        print("usage: python -m tileserver.warehouse.worker check_execution|processing_execution ID", file=sys.stderr)
        return 2
    settings = settings_from_env(os.environ[SETTINGS_ENV])
    lifecycle.set_node(settings.worker_node)
    return Worker(settings, argv[0], argv[1]).run()


if __name__ == "__main__":
    sys.exit(main())
