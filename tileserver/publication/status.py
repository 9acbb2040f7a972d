"""Every status a record of the store can have, one enumeration per kind of record, so every module
speaks of the same states; which change is allowed when lives in `tileserver.warehouse.lifecycle`,
the only module that changes them. Kept here, below the store, because the store reads and writes
stored data and offering statuses (and the warehouse sits above the publication store).

Jobs (check executions, processing executions, pyramid shards): a processing execution is CREATED
until launched; a job is WAITING until a worker takes it, PROGRESS while it runs, then SUCCESS,
FAILURE or ABORTED (final). Uploads are OPEN while files are pushed, CHECKING once closed, then
CLOSED or UNSTABLE. Stored data are CREATED with their execution, GENERATING while written, then
GENERATED or UNSTABLE. Offerings are PUBLISHING until served, then PUBLISHED or UNSTABLE.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    CREATED = "CREATED"
    WAITING = "WAITING"
    PROGRESS = "PROGRESS"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    ABORTED = "ABORTED"


class UploadStatus(StrEnum):
    """The platform's upload statuses; CREATED, GENERATING, MODIFYING and DELETED are never entered
    here (DELETED is shown for an execution input removed since)."""

    CREATED = "CREATED"
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    CHECKING = "CHECKING"
    GENERATING = "GENERATING"
    MODIFYING = "MODIFYING"
    UNSTABLE = "UNSTABLE"
    DELETED = "DELETED"


class StoredDataStatus(StrEnum):
    """DELETED is never stored: it is shown for an execution input or output removed since."""

    CREATED = "CREATED"
    GENERATING = "GENERATING"
    GENERATED = "GENERATED"
    UNSTABLE = "UNSTABLE"
    DELETED = "DELETED"


class OfferingStatus(StrEnum):
    """UNPUBLISHED is never stored: it is shown for an offering whose store record is gone."""

    PUBLISHING = "PUBLISHING"
    PUBLISHED = "PUBLISHED"
    UNSTABLE = "UNSTABLE"
    UNPUBLISHED = "UNPUBLISHED"


class ConfigurationStatus(StrEnum):
    """Never stored: a configuration is PUBLISHED while one of its offerings is in the store."""

    PUBLISHED = "PUBLISHED"
    UNPUBLISHED = "UNPUBLISHED"


FINAL = (JobStatus.SUCCESS, JobStatus.FAILURE, JobStatus.ABORTED)
RUNNING = (JobStatus.WAITING, JobStatus.PROGRESS)  # an execution holding its inputs and output
