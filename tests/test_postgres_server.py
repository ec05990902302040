"""The tests' throwaway PostgreSQL dies with the process that started it, even on SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postgres import postgres_bin

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed")

OWNER = """
import time
from tests.support.postgres import PostgresServer
server = PostgresServer()
print(server.process.pid, server.root, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_killed_owner_leaves_no_server_behind():
    root = Path(__file__).resolve().parent.parent
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    server_root = None
    try:
        pid, server_root = owner.stdout.readline().decode().split()
        server_pid = int(pid)
        assert _running(server_pid)
        owner.send_signal(signal.SIGKILL)  # no finalizer runs
        owner.wait()
        deadline = time.monotonic() + 30
        while _running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server_pid), "the server outlived the process that started it"
    finally:
        owner.kill()
        owner.wait()
        if server_root is not None:
            shutil.rmtree(server_root, ignore_errors=True)
