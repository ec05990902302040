import os

# Every Ray process of the tests chooses the loopback address (Ray reads this when it is
# first imported, which a plugin may do before tests/support/ray_cluster.py runs).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.service import service
from tests.support.synthetic import write_synthetic_bundle, write_synthetic_npz


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory) -> Path:
    """A complete bundle with untrained encoders; treat it as read-only."""
    return write_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "synthetic")


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "synthetic.npz")


@pytest.fixture(scope="session")
def wikipedia_bundle(tmp_path_factory) -> Path:
    """A real Wikipedia bundle, trained once per session (`cdpae train --quick`, about a
    minute); CDPAE_TEST_WIKIPEDIA_BUNDLE names an existing one to reuse instead (with the one
    `make run` trains, models/wikipedia, the README test also compares exact answers)."""
    existing = os.environ.get("CDPAE_TEST_WIKIPEDIA_BUNDLE")
    if existing:
        return Path(existing)
    out = tmp_path_factory.mktemp("wiki") / "wikipedia"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "train",
            "--data",
            "wikipedia",
            "--out",
            str(out),
            "--quick",
            "--no-plots",
            "--quiet",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


@pytest.fixture
def client(synthetic_bundle, tmp_path):
    """The service in-process on the synthetic bundle, with a fresh (seeded) gallery."""
    with service(synthetic_bundle, tmp_path / "data") as c:
        yield c


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (skipped where none is installed)."""
    from tests.support.postgres import PostgresServer, postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries are not installed")
    server = PostgresServer()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database on the session's server, named after the test."""
    import re
    import uuid

    name = re.sub(r"\W", "_", request.node.name)[:40].lower() + "_" + uuid.uuid4().hex[:6]
    return postgres_server.create_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    """Opens stores of one kind on one location (called again: a second handle, a restart)."""
    from app.store import open_store

    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened = []

    def open_one():
        store = open_store(url, tmp_path / "store")
        opened.append(store)
        return store

    open_one.kind = request.param
    yield open_one
    for store in opened:
        store.close()
