"""The client and `cdpae search` against the real service.

Two real setups on the synthetic bundle: the async client in process over
httpx.ASGITransport (create_app + its lifespan), and the sync client over the
network against a real `cdpae serve` process with a write key and a read key.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.bundle import DEFAULT_GALLERY
from app.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    GalleryItem,
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
)
from app.main import create_app
from app.search_cli import main as search_main
from app.settings import Settings
from tests.support.service import Server

WRITE_KEY, READ_KEY = "write-key-for-tests", "read-key-for-tests"


@pytest.fixture(scope="module")
def gallery(synthetic_bundle: Path) -> dict[str, np.ndarray]:
    with np.load(synthetic_bundle / DEFAULT_GALLERY, allow_pickle=False) as data:
        return {key: data[key] for key in ("ids", "categories", "image", "text")}


@pytest.fixture(scope="module")
def server(synthetic_bundle: Path, tmp_path_factory) -> Iterator[str]:
    """A real `cdpae serve` process on a free port; yields its base URL."""
    work = tmp_path_factory.mktemp("served-gallery")
    env = {"CDPAE_API_KEY": WRITE_KEY, "CDPAE_READ_API_KEY": READ_KEY, "CDPAE_LOG_LEVEL": "warning"}
    served = Server(synthetic_bundle, work / "data", work / "server.log", env=env)
    try:
        # The client itself waits: connection refused and the 503 of a loading
        # gallery are exactly what it retries.
        with Client(
            served.url, api_key=READ_KEY, retry=RetryPolicy(max_retries=12, backoff_base=0.1)
        ) as client:
            assert client.ready()["status"] == "ready"
        yield served.url
    finally:
        served.stop(timeout=20)


@pytest.fixture
def reader(server: str) -> Iterator[Client]:
    with Client(server, api_key=READ_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def writer(server: str) -> Iterator[Client]:
    with Client(server, api_key=WRITE_KEY, max_retries=0) as client:
        yield client


def test_search_returns_ranked_hits_with_metadata_for_each_query(reader, gallery):
    queries = gallery["image"][:3]
    results = reader.search_image_to_text(queries, top_k=5)
    assert len(results) == 3
    text_ids = set(gallery["ids"].tolist())
    for result in results:
        assert len(result.hits) == 5
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h.id in text_ids and "category" in h.metadata for h in result.hits)
    # one vector, as a plain list, gives the same answer as the batch's first row
    (single,) = reader.search_image_to_text(queries[0].tolist(), top_k=5)
    assert [h.id for h in single.hits] == [h.id for h in results[0].hits]


def test_both_directions_similarities_and_filters(reader, gallery):
    (by_text,) = reader.search_text_to_image(gallery["text"][0], top_k=4, similarity="cosine")
    assert len(by_text.hits) == 4
    category = str(gallery["categories"][0])
    (filtered,) = reader.search(
        "image", gallery["image"][0], top_k=50, filter={"category": category}
    )
    expected = int((gallery["categories"] == category).sum())
    assert len(filtered.hits) == expected
    assert {h.metadata["category"] for h in filtered.hits} == {category}


def test_gallery_upsert_get_delete_round_trip(writer, reader, gallery):
    before = reader.gallery_info("text")
    assert before.dim == gallery["text"].shape[1]
    vector = (gallery["text"][1] * 0.5).astype(np.float32)
    item = GalleryItem(id="client test?item#1", vector=vector.tolist(), metadata={"category": "x"})
    result = writer.upsert_items("text", [item])
    assert (result.upserted, result.count) == (1, before.count + 1)
    fetched = reader.get_item("text", "client test?item#1")
    assert fetched.metadata == {"category": "x"}
    np.testing.assert_allclose(fetched.vector, vector, rtol=1e-6)
    deleted = writer.delete_item("text", "client test?item#1")
    assert (deleted.deleted, deleted.count) == ("client test?item#1", before.count)
    with pytest.raises(NotFoundError) as info:
        writer.delete_item("text", "client test?item#1")
    assert info.value.status == 404 and "client test?item#1" in info.value.message


def test_server_errors_arrive_as_typed_exceptions_with_the_servers_words(server, reader, gallery):
    dim = gallery["image"].shape[1]
    with pytest.raises(BadRequestError) as info:
        reader.search_image_to_text(np.ones((2, dim + 3)), top_k=3)
    error = info.value
    assert error.status == 422 and error.error_type == "invalid_request"
    assert error.field == "vectors[0]" and str(dim) in error.message
    with pytest.raises(BadRequestError) as info:
        reader.search_text_to_image(gallery["text"][0], top_k=0)
    assert info.value.field == "top_k"

    item = {"id": "nope", "vector": gallery["text"][0].tolist()}
    with pytest.raises(PermissionDeniedError) as denied:
        reader.upsert_items("text", [item])  # a read key may not write
    assert denied.value.status == 403
    with Client(server, max_retries=0) as anonymous, pytest.raises(AuthenticationError) as auth:
        anonymous.search_image_to_text(gallery["image"][0])
    assert auth.value.status == 401 and auth.value.field == "authorization"
    with (
        Client(server, api_key="wrong", max_retries=0) as wrong,
        pytest.raises(AuthenticationError),
    ):
        wrong.upsert_items("text", [item])
    assert reader.gallery_info("text").count == len(gallery["ids"])  # nothing was written


def test_async_client_in_process_matches_the_served_process(
    synthetic_bundle, tmp_path, reader, gallery
):
    settings = Settings(bundle=synthetic_bundle, data_dir=tmp_path, api_key=WRITE_KEY)
    app = create_app(settings, background_load=False)
    queries = gallery["image"][:2]

    async def run() -> tuple:
        async with (
            app.router.lifespan_context(app),
            AsyncClient(
                "http://testserver", api_key=WRITE_KEY, transport=httpx.ASGITransport(app=app)
            ) as client,
        ):
            health = await client.health()
            results = await client.search_image_to_text(queries, top_k=5)
            upserted = await client.upsert_items(
                "image", [{"id": "a1", "vector": queries[0], "metadata": {"k": 1}}]
            )
            fetched = await client.get_item("image", "a1")
            deleted = await client.delete_item("image", "a1")
            with pytest.raises(NotFoundError):
                await client.get_item("image", "a1")
            return health, results, upserted, fetched, deleted

    health, results, upserted, fetched, deleted = asyncio.run(run())
    assert health == {"status": "ok"}
    assert upserted.count == len(gallery["ids"]) + 1 and deleted.count == len(gallery["ids"])
    assert fetched.metadata == {"k": 1}
    # Same bundle, same default gallery: in-process and over-the-network agree.
    served = reader.search_image_to_text(queries, top_k=5)
    for local, remote in zip(results, served, strict=True):
        assert [h.id for h in local.hits] == [h.id for h in remote.hits]
        np.testing.assert_allclose(
            [h.score for h in local.hits], [h.score for h in remote.hits], rtol=1e-5
        )


def test_search_cli_prints_the_served_hits(server, reader, gallery, tmp_path, capsys):
    np.save(tmp_path / "q.npy", gallery["text"][:2])
    argv = ["--url", server, "--modality", "text", "--vector-file", str(tmp_path / "q.npy")]
    code = search_main([*argv, "--top-k", "3", "--api-key", READ_KEY])
    out = capsys.readouterr().out
    assert code == 0
    expected = reader.search_text_to_image(gallery["text"][:2], top_k=3)
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for block, result in zip(blocks, expected, strict=True):
        rows = block.splitlines()[3:]
        assert [row.split()[1] for row in rows] == [h.id for h in result.hits]
        assert [row.split()[2] for row in rows] == [f"{h.score:.4f}" for h in result.hits]
    # without the key the service says 401 and the command says so, exit 1
    assert search_main([*argv, "--top-k", "3"]) == 1
    assert "401" in capsys.readouterr().err
    # the same through the installed command line, key from the environment
    env = {**os.environ, "CDPAE_CLIENT_API_KEY": READ_KEY}
    shell = subprocess.run(
        [sys.executable, "-m", "app.cli", "search", *argv, "--top-k", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == out
