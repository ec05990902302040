"""Access: the optional write key and read-only key, through settings (CDPAE_API_KEY,
CDPAE_READ_API_KEY), and keys never written to logs, metrics or error bodies."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.support.service import Server, service

WRITE_KEY = "sk-write-7f3a9c2e51d04b88"
READ_KEY = "sk-read-0c4d2b9e77a14f31"
WRONG_KEY = "sk-wrong-5e8b1f0a3c6d9e27"
SECRETS = (WRITE_KEY, READ_KEY, WRONG_KEY)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _exercise(http: httpx.Client) -> dict[str, int]:
    """Every combination of key and access level; returns name -> status."""
    vector = http.get("/gallery/text/items/g-1", headers=_bearer(READ_KEY)).json()["vector"]
    query = http.get("/gallery/image/items/g-1", headers=_bearer(READ_KEY)).json()["vector"]
    item = {"items": [{"id": "new", "vector": vector}]}
    search = {"vectors": [query], "top_k": 3}
    s = {}
    s["write/none"] = http.put("/gallery/text/items", json=item).status_code
    s["write/wrong"] = http.put(
        "/gallery/text/items", json=item, headers=_bearer(WRONG_KEY)
    ).status_code
    s["write/read-key"] = http.put(
        "/gallery/text/items", json=item, headers=_bearer(READ_KEY)
    ).status_code
    s["delete/read-key"] = http.delete(
        "/gallery/text/items/g-2", headers=_bearer(READ_KEY)
    ).status_code
    s["write/basic-scheme"] = http.put(
        "/gallery/text/items", json=item, headers={"Authorization": f"Basic {WRITE_KEY}"}
    ).status_code
    s["write/write-key"] = http.put(
        "/gallery/text/items", json=item, headers=_bearer(WRITE_KEY)
    ).status_code
    s["delete/write-key"] = http.delete(
        "/gallery/text/items/new", headers=_bearer(WRITE_KEY)
    ).status_code
    s["search/none"] = http.post("/search/image-to-text", json=search).status_code
    s["search/wrong"] = http.post(
        "/search/image-to-text", json=search, headers=_bearer(WRONG_KEY)
    ).status_code
    s["search/read-key"] = http.post(
        "/search/image-to-text", json=search, headers=_bearer(READ_KEY)
    ).status_code
    s["search/write-key"] = http.post(
        "/search/image-to-text", json=search, headers=_bearer(WRITE_KEY)
    ).status_code
    s["get/none"] = http.get("/gallery/text/items/g-1").status_code
    s["info/read-key"] = http.get("/gallery/text", headers=_bearer(READ_KEY)).status_code
    s["healthz/none"] = http.get("/healthz").status_code
    s["metrics/none"] = http.get("/metrics").status_code
    return s


EXPECTED = {
    "write/none": 401,
    "write/wrong": 401,
    "write/read-key": 403,
    "delete/read-key": 403,
    "write/basic-scheme": 401,
    "write/write-key": 200,
    "delete/write-key": 200,
    "search/none": 401,
    "search/wrong": 401,
    "search/read-key": 200,
    "search/write-key": 200,
    "get/none": 401,
    "info/read-key": 200,
    "healthz/none": 200,  # probes stay open for the orchestrator
    "metrics/none": 200,
}


def test_keys_in_process_and_never_in_the_log(synthetic_bundle, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with service(
        synthetic_bundle, tmp_path / "data", api_key=WRITE_KEY, read_api_key=READ_KEY
    ) as http:
        assert _exercise(http) == EXPECTED
        r = http.put("/gallery/text/items", json={"items": []}, headers=_bearer(WRONG_KEY))
        error = r.json()["error"]
        assert r.status_code == 401 and error["field"] == "authorization"
        assert r.headers["www-authenticate"] == "Bearer"
        forbidden = http.delete("/gallery/text/items/g-3", headers=_bearer(READ_KEY)).json()
        assert forbidden["error"]["type"] == "forbidden"
        assert http.get("/gallery/text/items/g-3", headers=_bearer(READ_KEY)).status_code == 200
        metrics = http.get("/metrics").text
    logged = caplog.text
    assert "401" in logged  # the access log did record the refused requests
    for secret in SECRETS:
        assert secret not in logged and secret not in metrics


def test_write_key_only_leaves_reads_open(synthetic_bundle, tmp_path):
    with service(synthetic_bundle, tmp_path / "data", api_key=WRITE_KEY) as http:
        vector = http.get("/gallery/text/items/g-1").json()["vector"]
        item = {"items": [{"id": "x", "vector": vector}]}
        assert http.put("/gallery/text/items", json=item).status_code == 401
        assert (
            http.put("/gallery/text/items", json=item, headers=_bearer(WRITE_KEY)).status_code
            == 200
        )
        query = http.get("/gallery/image/items/g-1").json()["vector"]
        assert http.post("/search/image-to-text", json={"vectors": [query]}).status_code == 200


@pytest.mark.slow
def test_real_server_keys_from_env_never_logged(synthetic_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CDPAE_API_KEY", WRITE_KEY)
    monkeypatch.setenv("CDPAE_READ_API_KEY", READ_KEY)
    log = tmp_path / "server.log"
    server = Server(
        synthetic_bundle, tmp_path / "data", log, "--log-level", "debug", "--print-example"
    )
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert _exercise(http) == EXPECTED
    finally:
        server.stop()
    text = log.read_text()
    assert "curl -s -X POST" in text and "$CDPAE_READ_API_KEY" in text  # the example names the
    assert " 403 " in text and " 401 " in text  # variable, not its value; refusals were logged
    for secret in SECRETS:
        assert secret not in text


def test_invalid_settings_message_does_not_echo_the_keys(synthetic_bundle, monkeypatch, capsys):
    from app.serve_cli import main as serve_main

    monkeypatch.setenv("CDPAE_API_KEY", WRITE_KEY)
    monkeypatch.setenv("CDPAE_READ_API_KEY", READ_KEY)
    monkeypatch.setenv("CDPAE_MAX_BATCH", "zero")
    assert serve_main(["--bundle", str(synthetic_bundle)]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err
    for secret in SECRETS:
        assert secret not in err
