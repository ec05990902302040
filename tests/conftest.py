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


@pytest.fixture
def client(synthetic_bundle, tmp_path):
    """The service in-process on the synthetic bundle, with a fresh (seeded) gallery."""
    with service(synthetic_bundle, tmp_path / "data") as c:
        yield c
