"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary directory, on a free
loopback port, trust authentication, run by a non-root user (postgres refuses root).

`TILESERVER_TEST_PG_URL` (a server URL whose user may CREATE DATABASE) replaces it when set.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

ENV_URL = "TILESERVER_TEST_PG_URL"


def server_binaries() -> Path | None:
    """The directory of initdb/pg_ctl (Debian's /usr/lib/postgresql/<version>/bin, else PATH)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or ""  # server URL without a database name
        self._dir: str | None = None
        self._bin: Path | None = None
        self._user: str | None = None

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]] if self._bin else list(args)
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        if self.url:
            return self
        self._bin = server_binaries()
        if self._bin is None:
            raise RuntimeError("no PostgreSQL server binaries")
        self._dir = tempfile.mkdtemp(prefix="tileserver-pg-")
        if os.geteuid() == 0:  # postgres will not run as root
            self._user = "postgres"
            shutil.chown(self._dir, self._user)
        data, port = os.path.join(self._dir, "data"), _free_port()
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={self._dir}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", data, "-l", os.path.join(self._dir, "log"), "-o", options, "-w", "-t", "60",
                  "start")
        self.url = f"postgresql://postgres@127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._dir is None:
            return
        try:
            self._run("pg_ctl", "-D", os.path.join(self._dir, "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def create_database(self) -> str:
        """A fresh, empty database: its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return f"{self.url}/{name}"

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[-1]
        with psycopg.connect(self.url + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
