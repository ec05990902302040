"""Crash safety harness, shared by tests/test_reliability_crash.py and scripts/crash_test.py.

A real `cdpae serve` process; two writer threads (one per modality, so each id has one
ordered history) stream upserts and deletes and keep a ledger of what was acknowledged;
SIGKILL at a random moment; restart on the same data directory; then every id is checked:
- acknowledged upsert -> GET returns that exact version and a filtered search finds it;
- acknowledged delete -> GET 404 and no search names it;
- a request in flight at the kill (no answer) may have been applied or not, but entirely:
  the id shows the acknowledged state before it or the state it asked for, nothing else.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from app.store import STORE_FILE
from tests.support.service import Server

MODALITIES = ("image", "text")
OTHER = {"image": "text", "text": "image"}
# ids that need URL quoting travel through the real server too ('/' and a literal '%2F')
ID_FORMS = ("c-{n}", "c/{n}", "c%2F{n}", "c {n}")

State = tuple[int, tuple[float, ...]] | None  # (seq, vector) of a live item, or None


@dataclass
class CrashReport:
    kills: int = 0
    acked_upserts: int = 0
    acked_deletes: int = 0
    in_flight_requests: int = 0  # no answer before the kill
    in_flight_applied: int = 0  # of those, found applied (whole) after the restart
    refused: list[str] = field(default_factory=list)  # a write answered other than 200
    refused_disk_full: int = 0  # 507s (allowed when the run is on a nearly full disk)
    partial: list[str] = field(default_factory=list)  # a batch applied in part
    lost: list[str] = field(default_factory=list)  # acknowledged, then missing or wrong
    resurrected: list[str] = field(default_factory=list)  # deleted, then back
    unsearchable: list[str] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return (
            self.lost
            + self.resurrected
            + self.unsearchable
            + self.integrity
            + self.refused
            + self.partial
        )

    def summary(self) -> str:
        restarts = sorted(self.restart_seconds)
        median = restarts[len(restarts) // 2] if restarts else float("nan")
        return (
            f"{self.kills} SIGKILLs; acknowledged {self.acked_upserts} upserted items and "
            f"{self.acked_deletes} deletes; {self.in_flight_requests} requests in flight at a "
            f"kill ({self.in_flight_applied} found applied whole, the rest not at all, "
            f"{len(self.partial)} partial); lost {len(self.lost)}, resurrected "
            f"{len(self.resurrected)}, unsearchable {len(self.unsearchable)}, refused writes "
            f"{len(self.refused)}, 507 disk full {self.refused_disk_full}, integrity problems "
            f"{len(self.integrity)}; "
            f"restart to ready: median {median:.2f} s"
        )


class Ledger:
    """What the service acknowledged, per (modality, id), plus requests lost in flight."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, str], State] = {}
        # one dict per request that got no answer: what it asked for, id by id
        self.pending: list[dict[tuple[str, str], State]] = []
        self.seq = 0
        self.lock = threading.Lock()

    def next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def live(self, modality: str) -> set[str]:
        return {i for (m, i), s in self.state.items() if m == modality and s is not None}


def _url(modality: str, item_id: str) -> str:
    return f"/gallery/{modality}/items/{quote(item_id, safe='')}"


def _writer(
    url: str,
    modality: str,
    dim: int,
    ledger: Ledger,
    report: CrashReport,
    rng: random.Random,
    stop: threading.Event,
    n_ids: int,
    disk_full_ok: bool,
) -> None:
    ids = [form.format(n=n) for n in range(n_ids) for form in ID_FORMS]
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            live = [i for i in ids if ledger.state.get((modality, i)) is not None]
            if live and rng.random() < 0.35:
                item_id = rng.choice(live)
                intent: dict[str, State] = {item_id: None}
                request = http.build_request("DELETE", _url(modality, item_id))
            else:
                intent = {}
                items = []
                for item_id in rng.sample(ids, rng.randint(1, 4)):
                    seq = ledger.next_seq()
                    vector = tuple(round(rng.uniform(-3, 3), 3) for _ in range(dim))
                    intent[item_id] = (seq, vector)
                    items.append(
                        {
                            "id": item_id,
                            "vector": list(vector),
                            "metadata": {"crash": True, "seq": seq},
                        }
                    )
                request = http.build_request(
                    "PUT", f"/gallery/{modality}/items", json={"items": items}
                )
            try:
                response = http.send(request)
            except httpx.TransportError:
                # killed mid-request: this one may or may not have been applied
                with ledger.lock:
                    ledger.pending.append({(modality, i): st for i, st in intent.items()})
                report.in_flight_requests += 1
                return
            if response.status_code == 507 and disk_full_ok:
                report.refused_disk_full += 1  # refused, so not applied: the ledger stays
                time.sleep(0.01)
                continue
            if response.status_code != 200:
                report.refused.append(f"{response.status_code} {response.text[:200]}")
                return
            for item_id, state in intent.items():
                ledger.state[(modality, item_id)] = state
            if len(intent) == 1 and next(iter(intent.values())) is None:
                report.acked_deletes += 1
            else:
                report.acked_upserts += len(intent)


def _observe(http: httpx.Client, modality: str, item_id: str) -> State:
    r = http.get(_url(modality, item_id))
    if r.status_code == 404:
        return None
    r.raise_for_status()
    body = r.json()
    assert body["id"] == item_id, body
    return int(body["metadata"]["seq"]), tuple(round(v, 3) for v in body["vector"])


def verify(http: httpx.Client, ledger: Ledger, report: CrashReport, base: dict[str, int]) -> None:
    """Check the restarted service against the ledger; settle what was in flight."""
    pending, ledger.pending = ledger.pending, []
    keys = set(ledger.state).union(*pending) if pending else set(ledger.state)
    seen = {key: _observe(http, *key) for key in keys}
    for request in pending:
        # all or nothing: every id of an unanswered batch shows its new state, or none does
        applied = [seen[key] == wanted for key, wanted in request.items()]
        unchanged = [seen[key] == ledger.state.get(key) for key in request]
        if all(applied):
            report.in_flight_applied += 1
            ledger.state.update(request)
        elif not all(unchanged):
            report.partial.append(f"request {request} half applied: {seen}")
    for key in keys:
        modality, item_id = key
        acked = ledger.state.get(key)
        if seen[key] == acked:
            continue
        if acked is None:
            report.resurrected.append(f"{modality}/{item_id}: deleted, found {seen[key]}")
        else:
            report.lost.append(f"{modality}/{item_id}: acknowledged {acked}, found {seen[key]}")
    for modality in MODALITIES:
        live = ledger.live(modality)
        count = http.get(f"/gallery/{modality}").json()["count"]
        if count != base[modality] + len(live):
            report.lost.append(f"{modality}: count {count}, expected {base[modality] + len(live)}")
        query = http.get(f"/gallery/{OTHER[modality]}/items/g-0").json()["vector"]
        hits = http.post(
            f"/search/{OTHER[modality]}-to-{modality}",
            json={"vectors": [query], "top_k": 1000, "filter": {"crash": True}},
        ).json()["results"][0]["hits"]
        found = {h["id"] for h in hits}
        for item_id in live - found:
            report.unsearchable.append(f"{modality}/{item_id}: live but not found by search")
        for item_id in found - live:
            report.resurrected.append(f"{modality}/{item_id}: not live but found by search")


class MountRefused(Exception):
    """A small tmpfs could not be mounted here (not root, or no mount permission)."""


@contextmanager
def small_tmpfs(mount: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount` for the block, unmounted after it."""
    mount.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise MountRefused(run.stderr.strip() or f"mount exited with {run.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> Path:
    """Fill the file system but `leave` bytes."""
    stat = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def integrity_check(data_dir: Path) -> str:
    db = sqlite3.connect(data_dir / STORE_FILE)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def run_crash_rounds(
    bundle: Path,
    data_dir: Path,
    log_dir: Path,
    kills: int,
    *,
    seed: int = 0,
    n_ids: int = 12,
    max_write_seconds: float = 0.8,
    progress: Callable[[int, CrashReport], None] | None = None,
    disk_full_ok: bool = False,
    after_first_start: Callable[[], None] | None = None,
    store: str | None = None,
) -> CrashReport:
    """`kills` rounds of write-then-SIGKILL, a restart and a full check after each.

    store: a postgresql:// URL to keep the gallery there instead of SQLite under data_dir."""
    rng = random.Random(seed)
    report = CrashReport()
    ledger = Ledger()
    log_dir.mkdir(parents=True, exist_ok=True)
    base: dict[str, int] | None = None
    for round_no in range(kills + 1):
        started = time.monotonic()
        extra = ("--store", store) if store else ()
        server = Server(bundle, data_dir, log_dir / f"server-{round_no}.log", *extra)
        try:
            server.wait_ready()
            report.restart_seconds.append(time.monotonic() - started)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                if base is None:
                    base = {m: http.get(f"/gallery/{m}").json()["count"] for m in MODALITIES}
                    dims = {m: http.get(f"/gallery/{m}").json()["dim"] for m in MODALITIES}
                verify(http, ledger, report, base)
            if round_no == 0 and after_first_start is not None:
                after_first_start()  # e.g. fill the disk once the store exists
            if round_no == kills:
                break
            stop = threading.Event()
            writers = [
                threading.Thread(
                    target=_writer,
                    args=(
                        server.url,
                        m,
                        dims[m],
                        ledger,
                        report,
                        random.Random(rng.random()),
                        stop,
                        n_ids,
                        disk_full_ok,
                    ),
                )
                for m in MODALITIES
            ]
            for w in writers:
                w.start()
            time.sleep(rng.uniform(0.05, max_write_seconds))  # a random moment
            server.kill9()
            report.kills += 1
            stop.set()
            for w in writers:
                w.join(timeout=30)
            check = "ok" if store else integrity_check(data_dir)
            if check != "ok":
                report.integrity.append(f"after kill {report.kills}: {check}")
        finally:
            server.stop()
        if progress is not None:
            progress(round_no, report)
    return report
