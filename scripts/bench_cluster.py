"""The gallery on a Ray cluster vs one process, side by side in one run.

    python -m scripts.bench_cluster --bundle models/wikipedia --size 20000
    python -m scripts.bench_cluster --bundle models/wikipedia --serve   # + Ray Serve front end
                                                                       #   (needs ray[serve])

On one throwaway PostgreSQL server and one store of `size` Wikipedia-like text items (the
693 test texts plus synthetic ones, as scripts/bench_service.py makes them; the 693 test
images), it times:
1. the single process (`cdpae serve --store postgresql://...`): first start (embeds every
   item, writes the derived data back) and search latency;
2. the cluster: a head and one worker node (ray.cluster_utils.Cluster on 127.0.0.1), the
   front end a plain uvicorn `cdpae serve --ray ... --shards N` process: ready time with the
   stored derived data, search latency;
3. a full restart: every Ray node and the front end stopped, then started again (after every
   shard wrote its snapshot, which the restarted shards read: app/snapshot.py);
4. with --serve: the same FastAPI app as a Ray Serve deployment (serve.ingress) on that
   cluster, behind Serve's HTTP proxy: search latency.
Latencies are single-query requests, image -> text, top 10, p50 over `--queries` real test
images; GET /healthz is the HTTP floor of each front end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from scripts.bench_restart import _copy_to
from scripts.bench_service import _wait_for_ann, fill_store, single_latencies
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.ray_cluster import LocalCluster, ray_environment
from tests.support.service import Server


def _latencies(url: str, queries: np.ndarray) -> dict[str, float]:
    """p50 in ms of /healthz, knn and cosine searches at `url`."""
    with httpx.Client(base_url=url, timeout=60) as http:
        single_latencies(http, queries[:20], {})  # warm up
        health = []
        for _ in range(len(queries)):
            t0 = time.perf_counter()
            http.get("/healthz").raise_for_status()
            health.append(time.perf_counter() - t0)
        knn = single_latencies(http, queries, {"similarity": "knn"})
        cosine = single_latencies(http, queries, {"similarity": "cosine"})
    return {
        "healthz": 1000 * float(np.median(health)),
        "knn": 1000 * float(np.median(knn)),
        "cosine": 1000 * float(np.median(cosine)),
    }


def _serve_front_end(bundle: Path, store: str, shards: int) -> str:
    """The app as a Ray Serve deployment on the connected cluster; its proxy's URL."""
    from ray import serve

    from app.main import create_app
    from app.settings import Settings

    port = free_port()
    settings = Settings(bundle=bundle, store=store, ray="auto", shards=shards)
    fastapi_app = create_app(settings)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(fastapi_app)
    class Frontend:
        pass

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Frontend.bind(), route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the Serve front end did not become ready")


def _wait_for_snapshots(directory: Path, count: int, timeout: float = 1800) -> float:
    """Seconds until `count` shard snapshots (their pointer files) are in `directory`: the
    full restart then reads them (app/snapshot.py) instead of loading from the database."""
    started = time.monotonic()
    while len(list(directory.glob("*.json"))) < count:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{count} snapshots not in {directory} within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--size", type=int, default=20_000, help="text items in the gallery")
    p.add_argument("--shards", type=int, default=4, help="shard actors per modality")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--serve", action="store_true", help="also measure a Ray Serve front end")
    args = p.parse_args(argv)
    bundle = args.bundle.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with np.load(bundle / "default_gallery.npz") as g:
        queries = g["image"][: args.queries]
    postgres = PostgresServer()
    rows: list[tuple[str, str, float | None, dict[str, float]]] = []
    try:
        print(f"== filling {args.size:,} text items", flush=True)
        fill_store(work / "fill", bundle, args.size)
        url = postgres.create_database("bench")
        _copy_to(url, work / "fill")

        single = Server(bundle, work / "d1", work / "single.log", "--store", url)
        try:
            ready = single.wait_ready(3600)
            print(f"single process, first start (embeds): ready in {ready:.1f} s", flush=True)
            # Measure the served paths, not the exact fallback while ANN indexes build.
            print(f"  ANN indexes built {_wait_for_ann(single.url):.1f} s later", flush=True)
            rows.append(("single process", "uvicorn", ready, _latencies(single.url, queries)))
        finally:
            single.stop(timeout=60)

        for attempt in ("cluster start", "full restart"):
            cluster = LocalCluster(workers=1)
            front = Server(
                bundle,
                work / "d2",
                work / f"front-{attempt[:4]}.log",
                *("--store", url, "--ray", cluster.address, "--shards", str(args.shards)),
                env=ray_environment(cluster.tmp),
            )
            try:
                ready = front.wait_ready(3600)
                print(f"cluster, {attempt}: ready in {ready:.1f} s", flush=True)
                print(f"  ANN indexes built {_wait_for_ann(front.url):.1f} s later", flush=True)
                if attempt == "cluster start":
                    waited = _wait_for_snapshots(work / "d2" / "snapshots", 2 * args.shards)
                    print(f"  every shard's snapshot written {waited:.1f} s later", flush=True)
                rows.append(
                    (f"cluster, {attempt}", "uvicorn driver", ready, _latencies(front.url, queries))
                )
                if args.serve and attempt == "full restart":
                    import ray

                    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
                    serve_url = _serve_front_end(bundle, url, args.shards)
                    rows.append(("cluster", "Ray Serve", None, _latencies(serve_url, queries)))
            finally:
                front.stop(timeout=60)
                cluster.shutdown()
    finally:
        postgres.destroy()
    print(
        f"\n{args.size:,} text items, {args.shards} shards per modality on 2 Ray nodes; "
        f"p50 of {len(queries)} single-query requests (ms)"
    )
    print("| gallery | front end | ready (s) | /healthz | knn | cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for where, front_end, ready, lat in rows:
        shown = "" if ready is None else f"{ready:.1f}"
        print(
            f"| {where} | {front_end} | {shown} | {lat['healthz']:.2f} | {lat['knn']:.2f} | "
            f"{lat['cosine']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
