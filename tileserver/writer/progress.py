"""Progress of a run: a live bar on a terminal (slabs done, rate, ETA), sparse log lines otherwise.

Log lines are what a batch system (Kubernetes, the warehouse's execution logs) keeps: one when a
level starts, then at most one every `interval` seconds, and one when it ends.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("tileserver.writer")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, interval: float = 10.0,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.enabled = enabled
        self.label = ""
        self.total = self.done = self.skipped = 0
        self.started = self._last = 0.0

    def start(self, label: str, total: int, skipped: int = 0) -> None:
        """A new phase (a level) of `total` slabs, `skipped` of which a previous run finished."""
        self.label, self.total, self.done, self.skipped = label, total, skipped, skipped
        self.started = self._last = time.monotonic()
        if self.enabled and not self.tty:
            resumed = f" ({skipped} already done)" if skipped else ""
            log.info("%s: %d slabs to compute%s", label, total, resumed)
        if self.tty:
            self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.tty or now - self._last >= self.interval:
            self._last = now
            self._draw()

    def end(self) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s: %d slabs in %s", self.label, self.done, _duration(elapsed))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r\033[K{text}\n")
            self.stream.flush()
        else:
            log.info("%s", text)

    def _draw(self) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        computed = self.done - self.skipped
        rate = computed / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r\033[K{self.label} [{bar}] {self.done}/{self.total} slabs"
                              f" {rate:.1f}/s ETA {eta}")
            self.stream.flush()
        elif self.done and self.done < self.total:
            log.info("%s: %d/%d slabs, %.1f/s, ETA %s", self.label, self.done, self.total, rate, eta)
