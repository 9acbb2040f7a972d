"""The statuses of the warehouse's jobs (check executions and processing executions): one
enumeration, so every module speaks of the same states. Which change is allowed when lives in
`lifecycle`, the only module that changes them.

A processing execution is CREATED until launched; a job is WAITING until a worker takes it,
PROGRESS while it runs, then SUCCESS, FAILURE or ABORTED (final). A check execution starts WAITING.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    CREATED = "CREATED"
    WAITING = "WAITING"
    PROGRESS = "PROGRESS"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    ABORTED = "ABORTED"


FINAL = (Status.SUCCESS, Status.FAILURE, Status.ABORTED)
RUNNING = (Status.WAITING, Status.PROGRESS)  # an execution holding its inputs and output
