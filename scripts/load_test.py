"""Closed-loop load test of a real `cdpae serve` on 127.0.0.1, for docs/reliability.md.

    python -m scripts.load_test --bundle models/wikipedia --levels 1,8,32,128 --seconds 60

Each level runs N clients for a fixed time; every client sends one request, waits for the
answer, sends the next (closed loop): 90% searches (one query vector of a random direction,
top_k 10, knn) and 10% gallery writes (upsert of the client's own new item, or delete of one of
its acknowledged items). A 503/429 must carry Retry-After; the client then backs off 10-50 ms.
Reported per level: throughput, p50/p99/p99.9 latency of answered requests, shed requests,
errors (transport errors, timeouts, any other 5xx or unexpected status) and the server's RSS.
At the end every acknowledged upsert must be readable and every acknowledged delete gone.

Bounded: 127.0.0.1 only, at most --seconds per level, request timeout --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np

from tests.support.service import Server

OTHER = {"image": "text", "text": "image"}


@dataclass
class Level:
    clients: int
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {"search": [], "write": [], "shed": []}
    )
    statuses: dict[str, int] = field(default_factory=dict)
    shed: int = 0
    shed_without_retry_after: int = 0
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    unknown_writes: list[tuple[str, tuple[str, str]]] = field(default_factory=list)

    def row(self) -> dict:
        answered = self.latencies["search"] + self.latencies["write"]

        def pct(values: list[float], q: float) -> float:
            return float(np.percentile(values, q)) * 1e3 if values else float("nan")

        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "ok_per_s": round(len(answered) / self.seconds, 1),
            "searches": len(self.latencies["search"]),
            "writes": len(self.latencies["write"]),
            "p50_ms": round(pct(answered, 50), 1),
            "p99_ms": round(pct(answered, 99), 1),
            "p999_ms": round(pct(answered, 99.9), 1),
            "search_p50_ms": round(pct(self.latencies["search"], 50), 1),
            "write_p50_ms": round(pct(self.latencies["write"], 50), 1),
            "shed": self.shed,
            "shed_p50_ms": round(pct(self.latencies["shed"], 50), 1),
            "shed_without_retry_after": self.shed_without_retry_after,
            "errors": len(self.errors),
            "statuses": dict(sorted(self.statuses.items())),
            "rss_mb_start": self.rss_mb[0] if self.rss_mb else None,
            "rss_mb_max": max(self.rss_mb) if self.rss_mb else None,
            "rss_mb_end": self.rss_mb[-1] if self.rss_mb else None,
        }


@dataclass
class Ledger:
    live: dict[tuple[str, str], bool] = field(default_factory=dict)  # True: acked upsert


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams.

    Why not httpx.AsyncClient: in this environment one AsyncClient shared by 128 tasks served
    /healthz at ~55 requests/s while this raw client got ~3,000/s from the same server (and
    128 separate AsyncClients were slower still), so httpx would have measured itself.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout)
        except BaseException:
            self.close()  # the stream may hold half a response: never reuse it
            raise

    async def _request(
        self, method: str, path: str, body: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _client(
    conn: Connection,
    name: str,
    vectors: dict[str, np.ndarray],
    level: Level,
    ledger: Ledger,
    deadline: float,
    rng: random.Random,
) -> None:
    mine: list[tuple[str, str]] = []
    n = 0
    while time.monotonic() < deadline:
        write = rng.random() < 0.10
        modality = rng.choice(("image", "text"))
        row = vectors[modality][rng.randrange(len(vectors[modality]))]
        key: tuple[str, str] | None = None
        if not write:
            kind, method = "search", "POST"
            path = f"/search/{modality}-to-{OTHER[modality]}"
            body: bytes | None = json.dumps({"vectors": [row.tolist()], "top_k": 10}).encode()
        elif mine and rng.random() < 0.4:
            kind, method, body = "write", "DELETE", None
            key = mine.pop(rng.randrange(len(mine)))
            path = f"/gallery/{key[0]}/items/{quote(key[1], safe='')}"
        else:
            kind, method = "write", "PUT"
            n += 1
            key = (modality, f"{name}-{n}")
            noisy = row + np.float32(0.01) * np.random.default_rng(n).standard_normal(len(row))
            path = f"/gallery/{modality}/items"
            item = {"id": key[1], "vector": noisy.tolist(), "metadata": {"load": 1}}
            body = json.dumps({"items": [item]}).encode()
        started = time.perf_counter()
        try:
            status, headers, payload = await conn.request(method, path, body)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            level.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            if key is not None:
                level.unknown_writes.append((method, key))  # outcome unknown: settled at the end
            continue
        elapsed = time.perf_counter() - started
        level.statuses[str(status)] = level.statuses.get(str(status), 0) + 1
        if status in (429, 503):
            level.shed += 1
            level.latencies["shed"].append(elapsed)
            if "retry-after" not in headers:
                level.shed_without_retry_after += 1
            if method == "DELETE" and key is not None:
                mine.append(key)  # not applied: still live
            await asyncio.sleep(rng.uniform(0.01, 0.05))
            continue
        if status != 200:
            level.errors.append(f"{kind}: {status} {payload[:200]!r}")
            continue
        level.latencies[kind].append(elapsed)
        if method == "PUT" and key is not None:
            ledger.live[key] = True
            mine.append(key)
        elif method == "DELETE" and key is not None:
            ledger.live[key] = False


async def _run_level(
    port: int,
    pid: int,
    clients: int,
    seconds: float,
    timeout: float,
    vectors: dict[str, np.ndarray],
    ledger: Ledger,
    seed: int,
) -> Level:
    level = Level(clients)
    connections = [Connection(port, timeout) for _ in range(clients)]
    started = time.monotonic()
    deadline = started + seconds

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            level.rss_mb.append(round(_rss_mb(pid), 1))
            await asyncio.sleep(1.0)

    rng = random.Random(seed)
    await asyncio.gather(
        sample_rss(),
        *(
            _client(
                connections[i],
                f"c{clients}-{i}",
                vectors,
                level,
                ledger,
                deadline,
                random.Random(rng.random()),
            )
            for i in range(clients)
        ),
    )
    level.seconds = time.monotonic() - started
    for conn in connections:
        conn.close()
    return level


async def _verify(url: str, ledger: Ledger) -> tuple[int, int, list[str]]:
    """(acknowledged live items checked, acknowledged deletes checked, problems)."""
    problems: list[str] = []
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def check(key: tuple[str, str], live: bool) -> None:
            async with gate:
                r = await http.get(f"/gallery/{key[0]}/items/{quote(key[1], safe='')}")
            if r.status_code != (200 if live else 404):
                problems.append(
                    f"{key}: acknowledged {'upsert' if live else 'delete'}, "
                    f"GET says {r.status_code}"
                )

        await asyncio.gather(*(check(k, v) for k, v in ledger.live.items()))
    n_live = sum(ledger.live.values())
    return n_live, len(ledger.live) - n_live, problems


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(clients, [r["ok_per_s"] for r in rows], "o-", label="answered/s")
    a.plot(clients, [r["shed"] / r["seconds"] for r in rows], "s--", label="shed (503)/s")
    a.set_xscale("log", base=2)
    a.set_xlabel("closed-loop clients")
    a.set_ylabel("requests / s")
    a.legend()
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        b.plot(clients, [r[key] for r in rows], "o-", label=label)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("closed-loop clients")
    b.set_ylabel("latency of answered requests (ms)")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: a synthetic one)")
    p.add_argument("--levels", default="1,8,32,128", help="client counts, comma separated")
    p.add_argument("--seconds", type=float, default=60.0, help="duration of each level")
    p.add_argument("--timeout", type=float, default=30.0, help="client request timeout (s)")
    p.add_argument("--max-inflight", type=int, help="CDPAE_MAX_INFLIGHT for the server")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write a throughput/latency plot (PNG) here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="cdpae-load-") as tmp_name:
        tmp = Path(tmp_name)
        if args.bundle is None:
            from tests.support.synthetic import write_synthetic_bundle

            bundle = write_synthetic_bundle(tmp / "bundle")
        else:
            bundle = args.bundle
        with np.load(bundle / "default_gallery.npz", allow_pickle=False) as data:
            vectors = {m: np.asarray(data[m][:1000], dtype=np.float32) for m in ("image", "text")}
        env = {"CDPAE_LOG_LEVEL": "warning"}
        if args.max_inflight:
            env["CDPAE_MAX_INFLIGHT"] = str(args.max_inflight)
        server = Server(bundle, tmp / "data", tmp / "server.log", env=env)
        url, port = server.url, server.port
        rows: list[dict] = []
        try:
            server.wait_ready(timeout=300)
            counts = {m: httpx.get(f"{url}/gallery/{m}").json()["count"] for m in ("image", "text")}
            print(
                f"bundle {bundle}, gallery {counts}, levels {levels} x {args.seconds:.0f} s, "
                f"{os.cpu_count()} CPUs shared by the server and this load generator",
                flush=True,
            )
            ledger = Ledger()
            unknown = 0
            for i, clients in enumerate(levels):
                level = asyncio.run(
                    _run_level(
                        port,
                        server.proc.pid,
                        clients,
                        args.seconds,
                        args.timeout,
                        vectors,
                        ledger,
                        args.seed + i,
                    )
                )
                for _method, key in level.unknown_writes:
                    ledger.live.pop(key, None)  # no answer: either outcome is allowed
                unknown += len(level.unknown_writes)
                row = level.row()
                rows.append(row)
                print(json.dumps(row), flush=True)
                for line in level.errors[:5]:
                    print("  ERROR", line, flush=True)
            n_live, n_deleted, problems = asyncio.run(_verify(url, ledger))
            alive = server.proc.poll() is None
        finally:
            server.stop(timeout=15)
    print(
        f"writes checked after the run: {n_live} acknowledged upserts readable, "
        f"{n_deleted} acknowledged deletes gone; lost: {len(problems)}; writes without an "
        f"answer (excluded): {unknown}; server alive: {alive}"
    )
    for line in problems[:20]:
        print("  LOST", line)
    print(
        "\n| clients | answered/s | p50 ms | p99 ms | p99.9 ms | shed 503 | errors | RSS MB max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['ok_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['p999_ms']} | {r['shed']} | {r['errors']} | {r['rss_mb_max']} |"
        )
    result = {
        "bundle": str(bundle),
        "levels": rows,
        "lost_writes": len(problems),
        "acked_live_checked": n_live,
        "acked_deletes_checked": n_deleted,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        _plot(rows, args.plot)
    errors = sum(r["errors"] for r in rows) + sum(r["shed_without_retry_after"] for r in rows)
    return 1 if problems or errors or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
