"""Shared helpers for the service tests: an in-process client and a real uvicorn process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.main import create_app
from app.settings import Settings
from tests.support.ports import free_port

with warnings.catch_warnings():
    # starlette.testclient (an httpx.Client over the ASGI app, lifespan included)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@contextmanager
def service(bundle: Path, data_dir: Path, **overrides) -> Iterator[TestClient]:
    """The app in-process with its lifespan run; the gallery is built before the first request."""
    settings = Settings(bundle=bundle, data_dir=data_dir, **overrides)
    with TestClient(create_app(settings, background_load=False)) as client:
        yield client


def serve_argv(bundle: Path, data_dir: Path, port: int, *extra: str) -> list[str]:
    """The command that runs `cdpae serve` on 127.0.0.1:port in a fresh interpreter."""
    return [
        sys.executable, "-m", "app.cli", "serve",
        "--bundle", str(bundle), "--data-dir", str(data_dir),
        "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


class Server:
    """`cdpae serve` as a real subprocess on a free 127.0.0.1 port (tests and scripts).

    `env` adds to (or overrides) the environment the server starts with; `cwd` is where it
    runs, hence whose `app` package `python -m app.cli` imports (another checkout's, to
    benchmark two versions side by side).
    """

    def __init__(
        self,
        bundle: Path,
        data_dir: Path,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CDPAE_LOG_LEVEL": "info", **(env or {})}
        self.log = log
        self._log_file = log.open("ab")
        self.started = time.monotonic()  # when the process was spawned
        self.proc = subprocess.Popen(
            serve_argv(bundle, data_dir, self.port, *extra),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until /readyz answered 200 (the gallery is loaded)."""
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready: {self.log.read_text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log_file.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL if it takes longer than `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
