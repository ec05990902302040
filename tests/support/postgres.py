"""A throwaway PostgreSQL server for tests and scripts, from the binaries on this machine.

PostgreSQL refuses to run as root, so when the tests run as root the data directory belongs
to the unprivileged `postgres` system user and the server runs as that user (runuser). It
listens on 127.0.0.1 on a free port (never 5432) and on a unix socket in its own directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.support.service import free_port

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]


def postgres_bin() -> Path | None:
    """Where initdb and pg_ctl are, or None on a machine without PostgreSQL."""
    for directory in BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


class PostgresServer:
    """initdb + pg_ctl start in a temp dir; `url(db)` names a database on it."""

    def __init__(self, root: Path | None = None) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) are not installed")
        self.bin = bin_dir
        self.root = Path(root or tempfile.mkdtemp(prefix="cdpae-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if self.user:
            shutil.chown(self.root, self.user)
            shutil.chown(self.socket_dir, self.user)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()

    def _run(self, *argv: str) -> None:
        command = ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)
        subprocess.run(command, check=True, capture_output=True, cwd=self.root)

    def start(self, timeout: float = 30.0) -> float:
        """Start (or restart) the server; seconds until it accepts connections."""
        started = time.monotonic()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.socket_dir} -c max_connections=100"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(int(timeout)), "start",
        )  # fmt: skip
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast (or immediate: like a crash, no shutdown checkpoint)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
