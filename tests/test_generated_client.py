"""A client generated from the live /openapi.json (openapi-python-client) works, errors included.

Both searches, upsert, get and delete succeed through it, and a 404, a 422 and a 401 come
back parsed as the documented ErrorResponse, not as UnexpectedStatus. docs/api.md's example is
run here too, and its printed output must match the one in the page. About 5 s: two real
servers, two generations (~1 s each).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.reliability_fuzz import READ_KEY, WRITE_KEY
from tests.support.service import Server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GENERATOR = Path(sys.executable).parent / "openapi-python-client"


def generate(url: str, out_dir: Path, package: str) -> None:
    """What docs/api.md tells a user to run (post hooks off: formatting is not the point)."""
    config = out_dir / "generator.yaml"
    config.write_text("post_hooks: []\n")
    subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--url",
            f"{url}/openapi.json",
            "--meta",
            "none",
            "--output-path",
            str(out_dir / package),
            "--config",
            str(config),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def keyed(synthetic_bundle, tmp_path_factory):
    """(server, generated package) with both keys configured."""
    tmp = tmp_path_factory.mktemp("generated")
    server = Server(
        synthetic_bundle,
        tmp / "data",
        tmp / "server.log",
        env={"CDPAE_API_KEY": WRITE_KEY, "CDPAE_READ_API_KEY": READ_KEY},
    )
    try:
        server.wait_ready()
        generate(server.url, tmp, "cdpae_keyed_client")
        sys.path.insert(0, str(tmp))
        yield server, importlib.import_module("cdpae_keyed_client")
    finally:
        sys.path.remove(str(tmp))
        for name in [m for m in sys.modules if m.startswith("cdpae_keyed_client")]:
            del sys.modules[name]
        server.stop()


def test_generated_client_round_trip_and_typed_errors(keyed):
    server, gen = keyed
    from cdpae_keyed_client.api.gallery import delete_item, gallery_info, get_item, upsert_items
    from cdpae_keyed_client.api.search import search_image_to_text, search_text_to_image
    from cdpae_keyed_client.models import (
        ErrorResponse,
        GalleryInfo,
        GalleryItem,
        GalleryItemMetadata,
        Item,
        Modality,
        SearchRequest,
        SearchResponse,
        Similarity,
        UpsertRequest,
    )

    writer = gen.AuthenticatedClient(server.url, token=WRITE_KEY, raise_on_unexpected_status=True)
    reader = gen.AuthenticatedClient(server.url, token=READ_KEY, raise_on_unexpected_status=True)

    dims = {}
    for modality in Modality:
        info = gallery_info.sync(modality, client=reader)
        assert isinstance(info, GalleryInfo) and info.modality is modality
        dims[modality] = info.dim

    # both searches
    hits = search_image_to_text.sync(
        client=reader,
        body=SearchRequest(vectors=[[0.5] * dims[Modality.IMAGE]], top_k=3),
    )
    assert isinstance(hits, SearchResponse) and len(hits.results[0].hits) == 3
    cosine = search_text_to_image.sync(
        client=reader,
        body=SearchRequest(vectors=[[0.5] * dims[Modality.TEXT]] * 2, similarity=Similarity.COSINE),
    )
    assert isinstance(cosine, SearchResponse) and len(cosine.results) == 2

    # upsert, get, delete (an id with a slash: the generated client must quote it)
    item_id = "generated/1"
    vector = [0.25] * dims[Modality.TEXT]
    metadata = GalleryItemMetadata.from_dict({"category": "art"})
    body = UpsertRequest(items=[GalleryItem(id=item_id, vector=vector, metadata=metadata)])
    upserted = upsert_items.sync(Modality.TEXT, client=writer, body=body)
    assert upserted.upserted == 1, upserted
    item = get_item.sync(Modality.TEXT, item_id, client=reader)
    assert isinstance(item, Item) and item.id == item_id
    assert item.metadata.to_dict() == {"category": "art"}
    assert item.vector == pytest.approx(vector)
    assert delete_item.sync(Modality.TEXT, item_id, client=writer).deleted == item_id

    # 404: the item is gone
    missing = get_item.sync_detailed(Modality.TEXT, item_id, client=reader)
    assert missing.status_code == 404 and isinstance(missing.parsed, ErrorResponse)
    assert (missing.parsed.error.type_, missing.parsed.error.field) == ("not_found", "id")

    # 422: a vector of the wrong dimension, named by the field
    wrong = search_text_to_image.sync_detailed(
        client=reader, body=SearchRequest(vectors=[[0.5] * (dims[Modality.TEXT] + 1)])
    )
    assert wrong.status_code == 422 and isinstance(wrong.parsed, ErrorResponse)
    assert (wrong.parsed.error.type_, wrong.parsed.error.field) == ("invalid_request", "vectors[0]")
    assert f"expected {dims[Modality.TEXT]} floats" in wrong.parsed.error.message

    # 401: a wrong key; 403: the read key writing
    stranger = gen.AuthenticatedClient(server.url, token="wrong", raise_on_unexpected_status=True)
    refused = gallery_info.sync_detailed(Modality.IMAGE, client=stranger)
    assert refused.status_code == 401 and isinstance(refused.parsed, ErrorResponse)
    assert refused.parsed.error.field == "authorization"
    forbidden = delete_item.sync_detailed(Modality.TEXT, "g-1", client=reader)
    assert forbidden.status_code == 403 and forbidden.parsed.error.type_ == "forbidden"


def _docs_example() -> tuple[str, str, str]:
    """(generate command, python code, printed output) of docs/api.md's generated-client part."""
    page = (REPO / "docs" / "api.md").read_text()
    section = page.split("## A generated client")[1].split("\n## ")[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)
    (command,) = [code for lang, code in blocks if lang == "bash"]
    (python,) = [code for lang, code in blocks if lang == "python"]
    (output,) = [code for lang, code in blocks if lang == "text"]
    return command, python, output


def test_docs_api_example_prints_what_the_page_says(synthetic_bundle, tmp_path):
    command, code, expected = _docs_example()
    server = Server(synthetic_bundle, tmp_path / "data", tmp_path / "server.log")
    try:
        server.wait_ready()
        # the page's command, verbatim but for the port (and the config turning post hooks off)
        assert command.strip().startswith(".venv/bin/openapi-python-client generate")
        assert "--url http://127.0.0.1:8000/openapi.json" in command
        package = re.search(r"--output-path (\S+)", command).group(1)
        generate(server.url, tmp_path, package)
        run = subprocess.run(
            [sys.executable, "-c", code.replace("http://127.0.0.1:8000", server.url)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
