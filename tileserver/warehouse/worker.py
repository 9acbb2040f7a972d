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

from tileserver.publication.status import JobStatus
from tileserver.publication.store import VECTOR_DB, PublicationStore
from tileserver.settings import S3Cluster, Settings

from . import lifecycle
from .accounts import Accounts
from .checks import BY_ID as CHECKS
from .checks import run_check
from .entities import Entities, Entity
from .pyramid_home import written_bytes
from .runner import shardable
from .upload_files import upload_files
from .usage import PYRAMIDS, room

SETTINGS_ENV = "TILESERVER_WAREHOUSE_SETTINGS"
TAKE_OVER_AFTER = 3.0  # seconds a shard stays unclaimed before its execution's process runs it itself
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
        self.parent_id: str | None = None  # a shard's execution
        self.also_beat: list[str] = []  # shards this execution's process runs itself

    def _parent_ended(self) -> bool:
        parent = self.entities.get(lifecycle.EXECUTION, self.parent_id or "")
        return parent is None or parent.body.get("status") in lifecycle.FINAL

    def flush(self) -> None:
        self.entities.append_logs(self.job_id, self.log.take())

    def _beat(self) -> None:
        while not self.done.wait(beat_every(self.settings)):
            try:
                status = lifecycle.beat(self.entities, self.kind, self.job_id, os.getpid())
                for shard_id in list(self.also_beat):
                    lifecycle.beat(self.entities, lifecycle.SHARD, shard_id, os.getpid())
                if status == lifecycle.LOST:  # silent past the lease: requeued, another worker runs it
                    self.kill()
                self.flush()
                over = self.over_quota() if status == JobStatus.PROGRESS and self._measure_now() else None
            except Exception:  # a busy store: try again at the next beat
                continue
            if status == JobStatus.ABORTED:
                self.log.add("aborted")
                self.flush()
                self.kill()
            elif self.parent_id is not None and self._parent_ended():
                if lifecycle.stop_running(self.entities, self.kind, self.job_id, "its execution ended: shard stopped"):
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
            status, result = JobStatus.FAILURE, {}
        self.done.set()
        lifecycle.finish(self.store, self.entities, self.kind, self.job_id, status, self.settings, self.log.take(),
                         result, pid=os.getpid())
        return 0

    def _work(self, entity: Entity) -> tuple[JobStatus, dict[str, Any]]:
        if self.kind == lifecycle.CHECK:
            return self._check(entity)
        if self.kind == lifecycle.SHARD:
            return self._shard(entity)
        return self._execution(entity)

    def _check(self, entity: Entity) -> tuple[JobStatus, dict[str, Any]]:
        check = CHECKS[entity.body["check"]["_id"]]
        upload = self.entities.get("upload", entity.body["upload"]["_id"])
        if upload is None:
            self.log.add("the upload no longer exists")
            return JobStatus.FAILURE, {}
        self.log.add(f"{check.name} of upload {upload.body.get('name')}")
        with upload_files(self.settings, upload.id).local() as files:
            ok, found = run_check(check, files, upload.body.get("srs", ""), self.log.add, self.settings)
        self.log.add("passed" if ok else "failed")
        return (JobStatus.SUCCESS if ok else JobStatus.FAILURE), found

    def _sharded(self, entity: Entity, descriptor_url: str, count: int) -> dict[str, Any]:
        """The bottom level in `count` shards: shard 0 here, the others queued as jobs for any
        worker (those of an earlier run that ended without success queued again); then, once all
        are done, the upper levels, the list and the descriptor from their journals."""
        from .runner import ExecutionError, run_execution

        ids = [f"{entity.id}.shard-{k}" for k in range(1, count)]
        for k, shard_id in enumerate(ids, 1):
            existing = self.entities.get(lifecycle.SHARD, shard_id)
            if existing is None:
                lifecycle.create(self.entities, lifecycle.SHARD, entity.datastore_id, {
                    "execution": {"_id": entity.id}, "shard": [k, count], "queued": time.time()}, entity_id=shard_id)
            elif existing.body.get("status") in (JobStatus.FAILURE, JobStatus.ABORTED):
                lifecycle.requeue_shard(self.entities, shard_id)
        self.log.add(f"bottom level in {count} shards: shard 0/{count} here, the others queued for any worker")
        own = run_execution(self.settings, self.store, self.entities, entity, descriptor_url, shard=(0, count))
        self.log.add(f"shard 0/{count} written: {own.get('slabs')} slab(s)")
        while True:
            shards = [self.entities.get(lifecycle.SHARD, i) for i in ids]
            idle = next((s for s in shards if s is not None and s.body.get("status") == JobStatus.WAITING
                         and time.time() - float(s.body.get("queued", 0)) > TAKE_OVER_AFTER), None)
            if idle is not None and lifecycle.take_over(self.entities, lifecycle.SHARD, idle.id, os.getpid()):
                self._own_shard(entity, idle, descriptor_url)
                continue
            failed = [i for i, s in zip(ids, shards, strict=True)
                      if s is None or s.body.get("status") in (JobStatus.FAILURE, JobStatus.ABORTED)]
            if failed:
                raise ExecutionError(f"shard(s) failed: {', '.join(failed)}")
            if all(s is not None and s.body.get("status") == JobStatus.SUCCESS for s in shards):
                break
            time.sleep(0.5)
        self.log.add("all shards written: upper levels, list and descriptor")
        return run_execution(self.settings, self.store, self.entities, entity, descriptor_url, finish=count,
                             wait=60.0)

    def _own_shard(self, execution: Entity, shard: Entity, descriptor_url: str) -> None:
        """A shard no worker took, run here (beaten along with the execution)."""
        from .runner import run_execution

        k, n = shard.body["shard"]
        self.also_beat.append(shard.id)
        try:
            report = run_execution(self.settings, self.store, self.entities, execution, descriptor_url, shard=(k, n))
        finally:
            self.also_beat.remove(shard.id)
        self.log.add(f"shard {k}/{n} written here (no worker took it): {report.get('slabs')} slab(s)")
        lifecycle.finish(self.store, self.entities, lifecycle.SHARD, shard.id, JobStatus.SUCCESS, self.settings,
                         result={"report": report}, pid=os.getpid())

    def _shard(self, entity: Entity) -> tuple[JobStatus, dict[str, Any]]:
        """One share of an execution's bottom level, for the execution's own job process to finish."""
        from .runner import run_execution

        self.parent_id = entity.body["execution"]["_id"]
        execution = self.entities.get(lifecycle.EXECUTION, self.parent_id)
        if execution is None or execution.body.get("status") != JobStatus.PROGRESS:
            self.log.add("its execution is no longer running")
            return JobStatus.FAILURE, {}
        stored = self.store.get_stored_data(execution.body["output"]["stored_data"]["_id"])
        if stored is None:
            self.log.add("the output stored data no longer exists")
            return JobStatus.FAILURE, {}
        k, n = entity.body["shard"]
        self.log.add(f"shard {k}/{n} of execution {execution.id}")
        report = run_execution(self.settings, self.store, self.entities, execution, stored.descriptor_url,
                               shard=(k, n))
        line = f"shard {k}/{n} written by node {lifecycle.HOST}: {report.get('slabs')} slab(s)"
        self.log.add(line)
        self.entities.append_logs(execution.id, [lifecycle.log_line(line)])
        return JobStatus.SUCCESS, {"report": report}

    def _execution(self, entity: Entity) -> tuple[JobStatus, dict[str, Any]]:
        from .runner import run_execution

        output = entity.body["output"]["stored_data"]
        stored = self.store.get_stored_data(output["_id"])
        if stored is None:
            self.log.add("the output stored data no longer exists")
            return JobStatus.FAILURE, {}
        existing = bool(output.get("existing"))  # a base being changed keeps its summary meanwhile
        lifecycle.generating(self.store, stored, keep_summary=existing)
        self.datastore_id = entity.datastore_id
        if not existing:  # a base changed in place is measured once done, by its growth
            self.output_url = stored.descriptor_url
        what = "base" if stored.type == VECTOR_DB else "pyramid"
        self.log.add(f"{entity.body['processing']['name']}: output {what} {stored.descriptor_url}")
        if self.settings.worker_shards > 1 and shardable(self.settings, entity):
            summary = self._sharded(entity, stored.descriptor_url, self.settings.worker_shards)
        else:
            summary = run_execution(self.settings, self.store, self.entities, entity, stored.descriptor_url)
        size = int(summary.get("size", 0) or 0)
        self.output_url = stored.descriptor_url
        over = self.over_quota(size - (int(stored.summary.get("size", 0) or 0) if existing else 0))
        if over is not None:  # finished between two beats: still refused
            self.log.add(over)
            return JobStatus.FAILURE, {}
        if stored.type == VECTOR_DB:
            tables = [r["name"] for r in summary.get("type_infos", {}).get("relations", [])]
            self.log.add(f"base written: tables {', '.join(tables)}, {size} bytes")
        else:
            self.log.add(f"pyramid written: levels {', '.join(summary.get('type_infos', {}).get('levels', []))},"
                         f" {size} bytes")
        return JobStatus.SUCCESS, {"summary": summary}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in lifecycle.JOB_KINDS:
        print(f"usage: python -m tileserver.warehouse.worker {'|'.join(lifecycle.JOB_KINDS)} ID", file=sys.stderr)
        return 2
    settings = settings_from_env(os.environ[SETTINGS_ENV])
    lifecycle.set_node(settings.worker_node)
    return Worker(settings, argv[0], argv[1]).run()


if __name__ == "__main__":
    sys.exit(main())
