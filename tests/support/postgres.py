"""A throwaway PostgreSQL server for tests and scripts, from the binaries on this machine.

PostgreSQL refuses to run as root, so when the tests run as root the data directory belongs
to the unprivileged `postgres` system user and the server runs as that user. It listens on
127.0.0.1 on a free port (never 5432) and on a unix socket in its own directory.

The server is this process's child (not daemonised by pg_ctl), started through setpriv with a
parent-death signal: when the test run is killed, the kernel sends the server SIGQUIT (an
immediate shutdown), so a killed pytest leaves no PostgreSQL behind. The signal is tied to
the thread that started the server, so start it from a thread that outlives its use.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.support.ports import free_port

BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]


def postgres_bin() -> Path | None:
    """Where initdb and postgres are, or None on a machine without PostgreSQL."""
    for directory in BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    return None


class PostgresServer:
    """initdb, then the server as a child process, in a temp dir; `url(db)` names a
    database on it."""

    def __init__(self, root: Path | None = None) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries (initdb, postgres) are not installed")
        self.bin = bin_dir
        self.root = Path(root or tempfile.mkdtemp(prefix="cdpae-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.process: subprocess.Popen[bytes] | None = None
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
        subprocess.run(
            [*self._as_server_user(), *argv], check=True, capture_output=True, cwd=self.root
        )

    def _as_server_user(self) -> list[str]:
        """How to run a PostgreSQL program: setpriv, as the server user (when root) and with
        SIGQUIT sent to it if this process dies."""
        if shutil.which("setpriv") is None:  # util-linux is missing: no parent-death signal
            return ["runuser", "-u", self.user, "--"] if self.user else []
        who = ["--reuid", self.user, "--regid", self.user, "--init-groups"] if self.user else []
        return ["setpriv", *who, "--pdeathsig", "SIGQUIT", "--"]

    def start(self, timeout: float = 30.0) -> float:
        """Start (or restart) the server; seconds until it accepts connections."""
        started = time.monotonic()
        argv = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=100",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*self._as_server_user(), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return time.monotonic() - started
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() - started > timeout:
                    self._halt(signal.SIGQUIT)
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start; its log ends:\n{tail}") from None
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: fast (SIGINT) or immediate (SIGQUIT: like a crash, no
        shutdown checkpoint)."""
        self._halt({"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])

    def _halt(self, signum: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signum)  # setpriv exec'd the server: this is the postmaster
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
