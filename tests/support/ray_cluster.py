"""A real multi-node Ray cluster on this machine for tests and benchmarks.

Every node on 127.0.0.1 (Ray would pick the machine's external address), the GCS on a free
port (6379 is taken on some machines), Ray's files under a temp dir of ours, and the node
failure detection tuned the way docs/cluster.md recommends (a dead node is noticed in
3.6-3.8 s instead of 14-16 s, the design notes measured).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.support.ports import free_port

# What docs/cluster.md tells operators to set on the head (`ray start --head`) as
# RAY_health_check_* environment variables.
HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def ray_environment(tmp: Path) -> dict[str, str]:
    """Environment for every process of a test cluster (nodes, drivers, front ends)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's own address choice: loopback
        "RAY_TMPDIR": str(tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


class LocalCluster:
    """`ray.cluster_utils.Cluster`: a head and `workers` worker nodes, all on 127.0.0.1."""

    def __init__(self, workers: int = 1, cpus_per_node: int = 2) -> None:
        # Short: Ray's socket paths must fit in 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        (self.tmp / "ray").mkdir()  # Ray writes $RAY_TMPDIR/ray/ray_current_cluster
        os.environ.update(ray_environment(self.tmp))
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus_per_node,
                "node_ip_address": "127.0.0.1",
                "gcs_server_port": free_port(),
                "include_dashboard": False,
                "temp_dir": str(self.tmp / "ray"),
                "_system_config": HEALTH_CHECK,
            },
        )
        self.workers = [self.add_worker(cpus_per_node) for _ in range(workers)]

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, cpus: int = 2):  # -> ray._private.node.Node
        return self.cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")

    def remove_worker(self, node, graceful: bool = False) -> None:
        """Take a node away; graceful=False: its processes are killed without warning."""
        self.cluster.remove_node(node, allow_graceful=graceful)
        if node in self.workers:
            self.workers.remove(node)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)
