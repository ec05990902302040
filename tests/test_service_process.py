"""`cdpae serve` as a process: refuses a broken bundle; acknowledged writes survive kill -9."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest

from app.serve_cli import main as serve_main
from tests.support.service import Server


def _broken_copy(bundle, tmp_path, name, action):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    action(broken / name)
    return broken


@pytest.mark.parametrize(
    ("name", "action", "says"),
    [
        ("train_index.bin", lambda p: p.unlink(), "file train_index.bin is missing"),
        (
            "text_encoder.onnx",
            lambda p: p.write_bytes(p.read_bytes()[:-10]),
            "file text_encoder.onnx fails its checksum",
        ),
    ],
)
def test_broken_bundle_stops_startup_naming_the_file(
    synthetic_bundle, tmp_path, capsys, name, action, says
):
    broken = _broken_copy(synthetic_bundle, tmp_path, name, action)
    code = serve_main(["--bundle", str(broken), "--data-dir", str(tmp_path / "d"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # nothing was started or written


def test_broken_bundle_exit_code_of_the_real_command(synthetic_bundle, tmp_path):
    broken = _broken_copy(synthetic_bundle, tmp_path, "default_gallery.npz", lambda p: p.unlink())
    run = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--bundle", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().endswith("file default_gallery.npz is missing")


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9(synthetic_bundle, tmp_path):
    data = tmp_path / "data"
    server = Server(synthetic_bundle, data, tmp_path / "server.log", "--print-example")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            vector = http.get("/gallery/text/items/g-2").json()["vector"]
            r = http.put(
                "/gallery/text/items",
                json={"items": [{"id": "durable", "vector": vector, "metadata": {"k": "v"}}]},
            )
            assert r.json() == {"upserted": 1, "count": 31}
            assert http.delete("/gallery/text/items/g-9").json()["count"] == 30
        server.kill9()  # no shutdown hook runs: only what was committed survives
    finally:
        server.stop()
    assert "curl -s -X POST" in (tmp_path / "server.log").read_text()  # --print-example
    again = Server(synthetic_bundle, data, tmp_path / "server2.log")
    try:
        again.wait_ready()
        with httpx.Client(base_url=again.url, timeout=10) as http:
            assert http.get("/gallery/text").json()["count"] == 30
            assert http.get("/gallery/text/items/durable").json()["metadata"] == {"k": "v"}
            assert http.get("/gallery/text/items/g-9").status_code == 404
            query = http.get("/gallery/image/items/g-2").json()["vector"]
            hits = http.post(
                "/search/image-to-text", json={"vectors": [query], "top_k": 30}
            ).json()["results"][0]["hits"]
            ids = [h["id"] for h in hits]
            assert "durable" in ids and "g-9" not in ids  # memory rebuilt from the store
    finally:
        again.stop()


@pytest.mark.slow
def test_restarts_read_the_snapshot_and_catch_up_on_what_came_after(synthetic_bundle, tmp_path):
    """SIGTERM writes the snapshot; the next start reads it. Writes after it, then kill -9:
    the start after reads the same snapshot and catches up, losing nothing."""
    data = tmp_path / "data"

    def search_ids(http: httpx.Client) -> list[str]:
        query = http.get("/gallery/image/items/g-2").json()["vector"]
        body = {"vectors": [query], "top_k": 100}
        hits = http.post("/search/image-to-text", json=body).json()["results"][0]["hits"]
        return sorted(h["id"] for h in hits)

    first = Server(synthetic_bundle, data, tmp_path / "1.log")
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=10) as http:
            vector = http.get("/gallery/text/items/g-2").json()["vector"]
            items = [{"id": f"a-{i}", "vector": vector, "metadata": {}} for i in range(5)]
            http.put("/gallery/text/items", json={"items": items}).raise_for_status()
    finally:
        first.stop(timeout=30)  # graceful: the snapshot is written
    assert "text gallery: snapshot of 35 items" in (tmp_path / "1.log").read_text()
    second = Server(synthetic_bundle, data, tmp_path / "2.log")
    try:
        second.wait_ready()
        with httpx.Client(base_url=second.url, timeout=10) as http:
            items = [{"id": f"b-{i}", "vector": vector, "metadata": {}} for i in range(3)]
            http.put("/gallery/text/items", json={"items": items}).raise_for_status()
            assert http.delete("/gallery/text/items/a-0").status_code == 200
            before_kill = search_ids(http)
        second.kill9()
    finally:
        second.stop()
    assert "text gallery: 35 items from the snapshot" in (tmp_path / "2.log").read_text()
    third = Server(synthetic_bundle, data, tmp_path / "3.log")
    try:
        third.wait_ready()
        with httpx.Client(base_url=third.url, timeout=10) as http:
            assert search_ids(http) == before_kill
            assert http.get("/gallery/text").json()["count"] == 37
    finally:
        third.stop()
    log = (tmp_path / "3.log").read_text()
    assert "text gallery: 35 items from the snapshot" in log
    assert "then 4 changes caught up" in log
