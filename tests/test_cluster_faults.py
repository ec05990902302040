"""Faults under load on a multi-node Ray cluster: nothing acknowledged is lost or hidden.

Head + 2 worker nodes on 127.0.0.1, 2 shard actors per modality, two front ends (real
`cdpae serve --ray` processes), a real PostgreSQL server. Writers upsert and delete through
one front end and, right after each acknowledgement, search for the item through the OTHER
front end (a filter on its unique tag): the answer must include it (or, for a delete, not)
or be 503 + Retry-After. Searchers run meanwhile. Faults, one after the other: kill -9 a
shard actor's process, remove a worker node without warning, kill -9 a front end (and start
it again), restart PostgreSQL. Each prints its recovery time; at the end every acknowledged
write is visible through both front ends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.bundle import MANIFEST, sha256_of
from tests.support.ray_cluster import LocalCluster, ray_environment
from tests.support.service import Server

pytestmark = pytest.mark.slow

SHARDS = 2
RECOVERY_LIMIT_S = 20.0  # the target is 10 s (docs/cluster.md); this machine is shared


@dataclass
class Load:
    """What the load threads saw."""

    acked: set[str] = field(default_factory=set)  # upserts acknowledged (and not deleted)
    deleted: set[str] = field(default_factory=set)  # deletes acknowledged
    # Deletes without an acknowledgement (503, or the front end died mid-request): they may
    # have committed, so these items may be there or not; nothing is asserted of them.
    unsure: set[str] = field(default_factory=set)
    statuses: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, what: str, response: httpx.Response | None) -> bool:
        """Record a response; True if it was a 200. 503 needs Retry-After; other 5xx and
        unexpected statuses are violations."""
        if response is None:
            key = f"{what} connection refused"
        else:
            key = f"{what} {response.status_code}"
            if response.status_code == 503 and "Retry-After" not in response.headers:
                self.violation(f"{what}: 503 without Retry-After")
            elif response.status_code not in (200, 503):
                self.violation(f"{what}: {response.status_code} {response.text[:200]}")
        with self.lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1
        return response is not None and response.status_code == 200

    def violation(self, message: str) -> None:
        with self.lock:
            self.violations.append(message)


def _call(client: httpx.Client, method: str, url: str, **kw) -> httpx.Response | None:
    try:
        return client.request(method, url, **kw)
    except httpx.TransportError:  # a killed front end: the client tries the other one
        return None


class Cluster:
    def __init__(self, bundle: Path, url: str, tmp: Path) -> None:
        self.bundle, self.url, self.tmp = bundle, url, tmp
        self.ray = LocalCluster(workers=2)
        self.fronts = [self.start_front(i) for i in range(2)]
        for front in self.fronts:
            front.wait_ready(timeout=180)
        self.image_dim = httpx.get(f"{self.fronts[0].url}/gallery/image").json()["dim"]
        self.text_dim = httpx.get(f"{self.fronts[0].url}/gallery/text").json()["dim"]

    def start_front(self, i: int, port: int | None = None) -> Server:
        """Front end i (on `port`: a restart keeps its address, as behind a load balancer)."""
        return Server(
            self.bundle,
            self.tmp / f"data{i}",
            self.tmp / f"front{i}.log",
            *("--store", self.url, "--ray", self.ray.address, "--shards", str(SHARDS)),
            env=ray_environment(self.ray.tmp),
            port=port,
        )


def _writer(cluster: Cluster, load: Load, stop: threading.Event, n: int) -> None:
    rng = np.random.default_rng(n)
    clients = [httpx.Client(base_url=f.url, timeout=30) for f in cluster.fronts]
    i = 0
    while not stop.is_set():
        i += 1
        item_id = f"w{n}-{i}"
        via = i % 2
        body = {
            "items": [
                {
                    "id": item_id,
                    "vector": rng.normal(size=cluster.image_dim).tolist(),
                    "metadata": {"tag": item_id},
                }
            ]
        }
        response = _call(clients[via], "PUT", "/gallery/image/items", json=body)
        if response is None:  # that front end is down: the other one
            via = 1 - via
            response = _call(clients[via], "PUT", "/gallery/image/items", json=body)
        if not load.saw("upsert", response):
            time.sleep(0.05)
            continue
        with load.lock:
            load.acked.add(item_id)
        _check_visible(cluster, clients[1 - via], clients[via], load, item_id, present=True)
        if i % 5 == 0:  # delete an earlier acknowledged item of this writer
            victim = f"w{n}-{i - 3}"
            if victim in load.acked:
                response = _call(clients[via], "DELETE", f"/gallery/image/items/{victim}")
                acknowledged = load.saw("delete", response)
                with load.lock:
                    load.acked.discard(victim)
                    (load.deleted if acknowledged else load.unsure).add(victim)
                if acknowledged:
                    _check_visible(
                        cluster, clients[1 - via], clients[via], load, victim, present=False
                    )
        time.sleep(0.02)
    for c in clients:
        c.close()


def _check_visible(
    cluster: Cluster,
    other: httpx.Client,
    same: httpx.Client,
    load: Load,
    item_id: str,
    present: bool,
) -> None:
    """A search started after the acknowledgement includes the item (or not, if deleted),
    through the other front end (or this one if the other is down), or answers 503."""
    body = {"vectors": [[0.1] * cluster.text_dim], "top_k": 1, "filter": {"tag": item_id}}
    response = None
    for client in (other, same):
        response = _call(client, "POST", "/search/text-to-image", json=body)
        if response is not None:
            break
    if load.saw("search-after-ack", response):
        ids = [h["id"] for h in response.json()["results"][0]["hits"]]
        if ids != ([item_id] if present else []):
            what = "upsert" if present else "delete"
            load.violation(f"{what} of {item_id} acknowledged, a later search saw {ids}")


def _searcher(cluster: Cluster, load: Load, stop: threading.Event) -> None:
    clients = [httpx.Client(base_url=f.url, timeout=30) for f in cluster.fronts]
    rng = np.random.default_rng(99)
    while not stop.is_set():
        client = clients[int(rng.integers(0, 2))]
        body = {"vectors": [rng.normal(size=cluster.text_dim).tolist()], "top_k": 5}
        response = _call(client, "POST", "/search/text-to-image", json=body)
        if load.saw("search", response):
            hits = response.json()["results"][0]["hits"]
            if len(hits) != 5:  # the gallery has far more: a partial answer
                load.violation(f"search answered {len(hits)} hits, asked for 5")
        time.sleep(0.01)
    for c in clients:
        c.close()


def _recovered_after(cluster: Cluster, started: float, fronts: list[Server]) -> float:
    """Seconds from `started` until a write and a search for it succeed through every live
    front end."""
    probe = 0
    while time.monotonic() < started + 120:
        probe += 1
        ok = True
        for front in fronts:
            item_id = f"probe-{time.monotonic_ns()}-{probe}"
            body = {"items": [{"id": item_id, "vector": [0.2] * cluster.image_dim,
                               "metadata": {"tag": item_id}}]}  # fmt: skip
            query = {"vectors": [[0.1] * cluster.text_dim], "top_k": 1, "filter": {"tag": item_id}}
            try:
                put = httpx.put(f"{front.url}/gallery/image/items", json=body, timeout=10)
                search = httpx.post(f"{front.url}/search/text-to-image", json=query, timeout=10)
            except httpx.TransportError:
                ok = False
                break
            found = search.status_code == 200 and search.json()["results"][0]["hits"]
            if put.status_code != 200 or not found:
                ok = False
                break
        if ok:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError("the cluster did not recover within 120 s")


def test_faults_under_load_lose_nothing(synthetic_bundle, postgres_server, tmp_path):
    import ray

    from app.cluster.frontend import NAMESPACE, actor_name

    url = postgres_server.create_database("cluster_faults")
    cluster = Cluster(synthetic_bundle, url, tmp_path)
    load, stop = Load(), threading.Event()
    threads = [threading.Thread(target=_writer, args=(cluster, load, stop, n)) for n in range(2)]
    threads.append(threading.Thread(target=_searcher, args=(cluster, load, stop)))
    recoveries: dict[str, float] = {}
    try:
        # This process is a driver too (to find and kill shards), on the loopback address.
        ray.init(address=cluster.ray.address, namespace=NAMESPACE, _node_ip_address="127.0.0.1")
        key = sha256_of(synthetic_bundle / MANIFEST)

        def shard(modality: str, index: int):
            return ray.get_actor(actor_name(key, modality, index, SHARDS), namespace=NAMESPACE)

        for t in threads:
            t.start()
        time.sleep(2)

        # 1. kill -9 a shard actor's process (the image gallery's: writes and searches use it)
        pid, _ = ray.get(shard("image", 0).whereabouts.remote())
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recoveries["kill -9 a shard actor"] = _recovered_after(cluster, started, cluster.fronts)
        assert ray.get(shard("image", 0).whereabouts.remote())[0] != pid  # a new process
        time.sleep(1)

        # 2. remove, without warning, a worker node that holds a shard
        nodes = {ray.get(shard(m, i).whereabouts.remote())[1] for m in ("image", "text")
                 for i in range(SHARDS)}  # fmt: skip
        victim = next(n for n in cluster.ray.workers if n.node_id in nodes)
        started = time.monotonic()
        cluster.ray.remove_worker(victim)
        recoveries["remove a worker node"] = _recovered_after(cluster, started, cluster.fronts)
        time.sleep(1)

        # 3. kill -9 a front end; the other answers meanwhile; start it again
        started = time.monotonic()
        port = cluster.fronts[1].port
        cluster.fronts[1].kill9()
        recoveries["kill -9 a front end (the other answers)"] = _recovered_after(
            cluster, started, cluster.fronts[:1]
        )
        cluster.fronts[1] = cluster.start_front(1, port)  # the load's clients find it again
        recoveries["front end restarted, ready"] = cluster.fronts[1].wait_ready(timeout=120)
        time.sleep(1)

        # 4. restart PostgreSQL
        started = time.monotonic()
        postgres_server.stop("immediate")
        time.sleep(2)
        postgres_server.start()
        recoveries["restart PostgreSQL (down 2 s)"] = _recovered_after(
            cluster, started, cluster.fronts
        )
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for name, seconds in recoveries.items():
            print(f"recovery: {name}: {seconds:.1f} s")
        print("statuses:", dict(sorted(load.statuses.items())))
    try:
        assert not load.violations, load.violations[:10]
        assert len(load.acked) > 50, load.statuses
        assert all(s <= RECOVERY_LIMIT_S for s in recoveries.values()), recoveries
        # Every acknowledged write is there through both front ends, deletes are gone.
        for front in cluster.fronts:
            with httpx.Client(base_url=front.url, timeout=30) as client:
                for item_id in sorted(load.acked):
                    assert client.get(f"/gallery/image/items/{item_id}").status_code == 200
                for item_id in sorted(load.deleted):
                    assert client.get(f"/gallery/image/items/{item_id}").status_code == 404
                for item_id in sorted(load.acked)[:: max(1, len(load.acked) // 100)]:
                    body = {"vectors": [[0.1] * cluster.text_dim], "top_k": 1,
                            "filter": {"tag": item_id}}  # fmt: skip
                    hits = client.post("/search/text-to-image", json=body).json()["results"]
                    assert [h["id"] for h in hits[0]["hits"]] == [item_id]
        print(
            f"{len(load.acked)} acknowledged items visible, {len(load.deleted)} deletes gone, "
            f"{len(load.unsure)} unacknowledged deletes not checked"
        )
    finally:
        for front in cluster.fronts:
            front.stop()
        cluster.ray.shutdown()
