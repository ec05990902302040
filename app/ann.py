"""The approximate path for large galleries: an HNSW index for inner products with the m_g.

S(q, g) = 1/2 + 1/2 m_q.m_g + s_q.t_g. The dense term is what the index ranks, on a
projection P m_g onto the top r principal directions of the training pool (the m_g are
convex mixes of pool vectors, so they live near that subspace: at r = 128 the residual
|m_g - P m_g| is at most 0.043 over the Wikipedia test texts). The rest is bounded for every
item g:
- the projection error: |m_q.m_g - Pm_q.Pm_g| <= |r_q| * r_max, with r_x = m_x - P m_x
  and r_max the largest residual norm of any gallery item;
- the sparse term s_q.t_g, by app.knn_certificate (over the gallery, then per cluster).
So after rescoring the index's L candidates exactly, an item the index did not return has
    S <= 1/2 + 1/2 (d_L + |r_q| r_max) + sparse bound,  d_L = the smallest Pm_q.Pm_g among
the candidates (if the index's own ranking is right). When that is below the k-th exact
score the top k is certified (app.knn_certificate.KnnCertificate); otherwise L doubles,
up to a cap. HNSW recall itself is measured in scripts/bench_service.py.

Cosine asks another index through the same loop: app.clusters, an inverted file over the
gallery's own projections, whose bound on the items it leaves out holds unconditionally.

`certified_top_k` is that widening loop, over any `CandidateSource`; `AnnIndex` the HNSW one.
hnswlib's add and query are not safe together: the caller (app.gallery.Gallery) holds a read
lock for queries and a write lock for changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from app.hnsw import HnswParams
from app.retrieval import top_k_by_id

# The first candidate list is at least gallery size / this (2,000 at 1M). On 1M
# Wikipedia-like items, three builds at ef_construction 200: recall@10 0.9997 / 0.9963 /
# 0.9963 with 2,000, 1.0 / 0.9967 / 0.9967 with 4,000 (/ 250), for 4.5-5.0 ms per query
# in-process instead of 8.3 (scripts/bench_ann_params.py, docs/service.md).
ITEMS_PER_CANDIDATE = 500
# The knn index searches L candidates with a beam (ef) of this many times L (rounded): 1.5 L
# kept 2 L's recall@10 on Wikipedia-like items (0.9967 at 200k, 0.9963 at 1M, one build each)
# for 1.45 vs 1.94 and 3.52 vs 4.48 ms per query in-process; 1 L lost 0.005 at 1M
# (docs/service.md, fifth and sixth sessions).
EF_PER_CANDIDATE: float = 1.5


# The knn index's graph (AnnIndex): space l2 over the lifted points. ef_construction: at 1M
# Wikipedia-like items knn recall@10 went 0.9867-0.9997 from build to build with 100
# (hnswlib's threaded insertion order), 0.9963-0.9967 with 200 (docs/service.md). ef is the
# beam between queries: each query raises it to EF_PER_CANDIDATE x its candidate list.
KNN_INDEX_HNSW = HnswParams(space="l2", M=16, ef_construction=200, ef=64)


@dataclass(frozen=True)
class AnnParams:
    hnsw: HnswParams = KNN_INDEX_HNSW
    candidates: int = 1024
    max_candidates: int = 8192
    # Cosine (app.clusters): how many clusters' worth of items one query rescores. At 1M
    # Wikipedia-like items, 64 of 4,096 clusters gave recall@10 0.993 in a prototype.
    cosine_probes: int = 96
    # Projection size (0 or >= C: none). 128 keeps knn recall@10 at 200k Wikipedia-like
    # items (0.9967, as 256) with 92.7 % certified (256: 94.3 %) in half the index memory
    # (656 B per item instead of 1,168: scripts/bench_ann_params.py, docs/service.md).
    dim: int = 128

    def __post_init__(self) -> None:
        if self.hnsw.space != "l2":  # AnnIndex reads its distances as squared L2 (lifting)
            raise ValueError(f"the knn index's space must be 'l2', not {self.hnsw.space!r}")


@dataclass(frozen=True)
class Candidates:
    """Gallery rows to rescore exactly, and a bound of the dot product (m_q.m_g for knn,
    the cosine for cosine) of every live item that is not among them."""

    rows: np.ndarray
    outside_dot: float


class CandidateSource(Protocol):
    def candidates(self, query: np.ndarray, size: int) -> Candidates: ...

    def search_sizes(self, n_live: int, k: int) -> tuple[int, int]:
        """The first candidate list's size and the largest it may widen to."""
        ...


class AnnIndex:
    """HNSW (space 'l2') over lifted projected m_g; label = gallery row.

    Lifting: [P m, sqrt(1 - |P m|^2)]. |P m| <= |m| <= 1 (m is a convex mix of unit
    vectors), so every lifted point has norm 1 and L2 order equals inner-product order for
    the query [P m_q, 0]. HNSW over the raw inner product (a non-metric) found only ~74% of
    the true top 256 on the Wikipedia bundle at 10k items; over the lifted points ~99.8%.
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        params: AnnParams,
        basis: np.ndarray | None = None,
        saved: Path | None = None,
    ) -> None:
        """An empty index for `capacity` rows, or (saved) the one `save` wrote there."""
        self.params = params
        self.basis = basis
        lifted_dim = (dim if basis is None else basis.shape[1]) + 1
        room = max(capacity, 16)
        self.index = (
            params.hnsw.new_index(lifted_dim, room)
            if saved is None
            else params.hnsw.load_index(saved, lifted_dim, room)
        )
        self.deleted: set[int] = set()
        self.max_residual = 0.0  # largest |m_g - P m_g| ever added

    def _project(self, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P m, |m - P m|) for rows of m."""
        dense = np.asarray(dense, dtype=np.float32)
        if self.basis is None:
            return dense, np.zeros(len(dense), dtype=np.float32)
        projected = dense @ self.basis
        gap = np.einsum("nc,nc->n", dense, dense) - np.einsum("nc,nc->n", projected, projected)
        return projected, np.sqrt(np.clip(gap, 0.0, None))

    def put(self, rows: np.ndarray, dense: np.ndarray, num_threads: int = 1) -> None:
        """Add or replace rows (a row freed by `remove` is reused in place)."""
        projected, residual = self._project(dense)
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        needed = int(rows.max()) + 1
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        for row in rows.tolist():
            if row in self.deleted:  # a deleted label is revived by overwriting it in place
                self.index.unmark_deleted(row)
                self.deleted.discard(row)
        self.max_residual = max(self.max_residual, float(residual.max()))
        norms2 = np.einsum("nc,nc->n", projected, projected)
        lifted = np.hstack([projected, np.sqrt(np.clip(1.0 - norms2, 0.0, None))[:, None]])
        self.index.add_items(
            np.ascontiguousarray(lifted, dtype=np.float32), rows, num_threads=num_threads
        )

    def save(self, path: Path) -> None:
        """hnswlib's own file of the graph and vectors (app.snapshot keeps the rest)."""
        self.index.save_index(str(path))

    @classmethod
    def restore(
        cls,
        path: Path,
        dim: int,
        capacity: int,
        params: AnnParams,
        basis: np.ndarray | None,
        max_residual: float,
        deleted: Sequence[int],
    ) -> AnnIndex:
        """An index saved by `save`, with the state it was saved with (app.snapshot)."""
        restored = cls(dim, capacity, params, basis, saved=path)
        restored.max_residual = max_residual
        restored.deleted = set(deleted)
        return restored

    def remove(self, row: int) -> None:
        try:
            self.index.mark_deleted(row)
        except RuntimeError:  # never added (a row that came and went while building)
            return
        self.deleted.add(row)

    def size_bytes(self) -> int:
        # data (dim floats) + level-0 links (2M ints + count) + label, per element
        per = self.index.dim * 4 + (2 * self.params.hnsw.M + 1) * 4 + 8
        return per * self.index.get_max_elements()

    def candidates(self, query: np.ndarray, size: int) -> Candidates:
        """The `size` best rows by projected dot; an item not returned has m_q.m_g at most
        the smallest of their projected dots + the projection slack (if HNSW's own ranking
        is right). RuntimeError when hnswlib can't fill the list (many deleted rows)."""
        rows, dots, slack = self.query(query, size)
        return Candidates(rows, float(dots.min()) + slack)

    def search_sizes(self, n_live: int, k: int) -> tuple[int, int]:
        params = self.params
        first = max(params.candidates, 2 * k, n_live // ITEMS_PER_CANDIDATE)
        return min(first, n_live, params.max_candidates), params.max_candidates

    def query(self, dense_query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(rows, Pm_q.Pm_g, slack): the k best rows by projected inner product, best first;
        slack = |r_q| r_max bounds how far a true m_q.m_g can be above its projected value."""
        projected, residual = self._project(dense_query[None, :])
        query = np.zeros((1, self.index.dim), dtype=np.float32)
        query[0, :-1] = projected[0]
        # set_ef then query is not atomic: a racing query may search with the other's beam.
        # hnswlib never searches with less than k, so that is a little less thorough or
        # slower, never wrong (the candidates are rescored exactly either way).
        self.index.set_ef(round(EF_PER_CANDIDATE * k))
        labels, distances = self.index.knn_query(query, k=k, num_threads=1)
        # squared L2 to a lifted point: |P m_q|^2 + 1 - 2 Pm_q.Pm_g
        dots = (float(query[0] @ query[0]) + 1.0 - distances[0].astype(np.float64)) / 2.0
        return labels[0].astype(np.int64), dots, float(residual[0]) * self.max_residual


@dataclass(frozen=True)
class CertifiedTopK:
    rows: np.ndarray  # gallery rows, best first
    scores: np.ndarray  # their exact scores
    path: Literal["approximate", "uncertified"]


def certified_top_k(
    index: CandidateSource,
    query: np.ndarray,
    certifies: Callable[[Candidates, float], bool],
    rescore: Callable[[np.ndarray], np.ndarray],
    ids: Sequence[str | None],
    k: int,
    n_live: int,
) -> CertifiedTopK | None:
    """The top k by the index's candidates rescored exactly, the list doubled until certified.

    `query` is what the index ranks by (m_q for knn, the unit embedding for cosine);
    `certifies(found, t)` says whether every live item the index did not return in `found`
    scores below t (from `found.outside_dot` and whatever else it knows); `rescore(rows)`
    gives the exact scores of gallery rows; `ids[row]` their ids (ties are broken by id, as
    on the exact path). None when the index can't fill its candidate list (many deleted
    rows): the caller then scores exactly.
    """
    size, largest = index.search_sizes(n_live, k)
    while True:
        try:
            found = index.candidates(query, size)
        except RuntimeError:
            return None
        rows = found.rows
        exact = rescore(rows)
        order = _top_k_of_rows(exact, rows, ids, k)
        threshold = exact[order[-1]]
        certified = certifies(found, float(threshold))
        if certified or size >= n_live or size >= largest:
            path: Literal["approximate", "uncertified"] = (
                "approximate" if certified or size >= n_live else "uncertified"
            )
            return CertifiedTopK(rows[order], exact[order], path)
        size = min(2 * size, n_live, largest)


def _top_k_of_rows(
    scores: np.ndarray, rows: np.ndarray, ids: Sequence[str | None], k: int
) -> np.ndarray:
    """top_k_by_id over candidate rows, looking up ids only for the scores that can make it
    (a Python list of every candidate's id cost 3.7 ms per query at 10k candidates)."""
    if len(scores) > k:
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        reaching = np.flatnonzero(scores >= threshold)
    else:
        reaching = np.arange(len(scores))
    best = top_k_by_id(scores[reaching], [ids[r] for r in rows[reaching].tolist()], k)
    return reaching[best]
