"""Crash safety against a real `cdpae serve`: SIGKILL at random moments while upserts and
deletes stream in, then everything acknowledged must be there (and searchable), everything
deleted must stay gone; and on a nearly full disk writes are refused cleanly (507) and the
store stays whole. Longer runs: scripts/crash_test.py (docs/reliability.md)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.support.reliability_crash import (
    MountRefused,
    fill,
    integrity_check,
    run_crash_rounds,
    small_tmpfs,
)
from tests.support.service import Server

KILLS = int(os.environ.get("CDPAE_CRASH_KILLS", "5"))


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_write(synthetic_bundle, tmp_path):
    report = run_crash_rounds(synthetic_bundle, tmp_path / "data", tmp_path / "logs", KILLS)
    print(report.summary())
    assert report.kills == KILLS
    assert report.problems == [], report.problems[:5]
    assert report.acked_upserts > 10 * KILLS and report.acked_deletes > KILLS, report.summary()


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_write_to_postgres(synthetic_bundle, tmp_path, postgres_url):
    report = run_crash_rounds(
        synthetic_bundle, tmp_path / "data", tmp_path / "logs", KILLS, store=postgres_url
    )
    print(report.summary())
    assert report.kills == KILLS
    assert report.problems == [], report.problems[:5]
    assert report.acked_upserts > 10 * KILLS and report.acked_deletes > KILLS, report.summary()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted for the test (root only); skipped where mounting is not allowed."""
    try:
        with small_tmpfs(tmp_path / "disk") as mount:
            yield mount
    except MountRefused as exc:
        pytest.skip(f"can't mount a small tmpfs here: {exc}")


@pytest.mark.slow
def test_sigkill_on_a_nearly_full_disk(synthetic_bundle, small_disk):
    report = run_crash_rounds(
        synthetic_bundle,
        small_disk / "data",
        small_disk.parent / "logs",
        2,
        seed=1,
        disk_full_ok=True,
        after_first_start=lambda: fill(small_disk, leave=160_000),
        max_write_seconds=1.5,
    )
    print(report.summary())
    assert report.problems == [], report.problems[:5]
    assert report.refused_disk_full > 0 and report.acked_upserts > 0, report.summary()


@pytest.mark.slow
def test_full_disk_refuses_writes_cleanly_and_keeps_the_store(synthetic_bundle, small_disk):
    data = small_disk / "data"
    logs = small_disk.parent
    server = Server(synthetic_bundle, data, logs / "full-1.log")
    acked: list[str] = []
    refused = []
    try:
        server.wait_ready()
        filler = fill(small_disk, leave=150_000)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            vector = http.get("/gallery/text/items/g-1").json()["vector"]
            for i in range(200):
                item = {"id": f"f-{i}", "vector": vector, "metadata": {"pad": "x" * 20_000}}
                r = http.put("/gallery/text/items", json={"items": [item]})
                if r.status_code == 200:
                    acked.append(item["id"])
                else:
                    refused.append((item["id"], r))
                    if len(refused) == 3:
                        break
            assert refused and acked, "the disk never filled, or filled at once"
            for item_id, r in refused:
                # refused means not applied: not readable, even on the connection that failed
                assert http.get(f"/gallery/text/items/{item_id}").status_code == 404
                assert r.status_code == 507, r.text
                error = r.json()["error"]
                assert (
                    error["type"] == "insufficient_storage" and "disk is full" in error["message"]
                )
            deleted = http.delete("/gallery/text/items/g-5")
            assert deleted.status_code in (200, 507), deleted.text
            # reads, searches and the count still agree with what was acknowledged
            expected = 30 + len(acked) - (deleted.status_code == 200)
            assert http.get("/gallery/text").json()["count"] == expected
            assert http.get(f"/gallery/text/items/{acked[-1]}").status_code == 200
            query = http.get("/gallery/image/items/g-1").json()["vector"]
            hits = http.post(
                "/search/image-to-text", json={"vectors": [query], "top_k": 1000}
            ).json()["results"][0]["hits"]
            assert {a for a in acked} <= {h["id"] for h in hits}
            assert len(hits) == expected
        server.kill9()
    finally:
        server.stop()
    assert integrity_check(data) == "ok"
    # restart on the still-full disk: everything acknowledged is back
    again = Server(synthetic_bundle, data, logs / "full-2.log")
    try:
        again.wait_ready()
        with httpx.Client(base_url=again.url, timeout=30) as http:
            assert http.get("/gallery/text").json()["count"] == expected
            assert all(http.get(f"/gallery/text/items/{a}").status_code == 200 for a in acked)
            filler.unlink()  # space again: writes work again
            item = {"id": "after", "vector": vector}
            assert http.put("/gallery/text/items", json={"items": [item]}).status_code == 200
            assert http.get("/gallery/text").json()["count"] == expected + 1
    finally:
        again.stop()
    assert integrity_check(data) == "ok"
    assert "Traceback" not in (logs / "full-1.log").read_text()


def test_the_checker_sees_a_lost_write_and_a_resurrected_delete(synthetic_bundle, tmp_path):
    """The oracle itself, against the in-process app: a ledger that disagrees is reported."""
    from tests.support.reliability_crash import CrashReport, Ledger, verify
    from tests.support.service import service

    with service(synthetic_bundle, tmp_path / "data") as http:
        vector = http.get("/gallery/text/items/g-1").json()["vector"]
        item = {"id": "c/1", "vector": vector, "metadata": {"crash": True, "seq": 1}}
        assert http.put("/gallery/text/items", json={"items": [item]}).status_code == 200
        ledger = Ledger()
        ledger.state[("text", "c/1")] = None  # the ledger says deleted: it is there
        ledger.state[("text", "c-2")] = (2, tuple(vector))  # the ledger says acked: it is not
        report = CrashReport()
        verify(http, ledger, report, {"image": 30, "text": 30})
    assert any("c/1" in r for r in report.resurrected)
    assert any("c-2" in r for r in report.lost)
