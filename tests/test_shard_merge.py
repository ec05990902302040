"""A gallery split into shards and merged ranks exactly like the whole gallery (no Ray).

The cluster's exactness rests on this: each shard scores its own rows with app.gallery's
code, and merging partial top-ks (ties by id) gives the whole gallery's top k with the same
scores, bit for bit. On the Wikipedia bundle (1024-d embeddings), replacing cosine_scores'
einsum by a BLAS product (`q @ g.T`) fails the filtered cosine case below: the product's
summation order depends on the matrix shape (docs/cluster.md, "the float-summation trap").
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

from app.bundle import Bundle, load_bundle
from app.gallery import Gallery, QueryBatch, merge_hits
from app.replica import derive
from app.retrieval import query_profile
from app.store import shard_of

N_SHARDS = 4


def text_gallery(bundle: Bundle) -> Gallery:
    embed = partial(bundle.embed, "text")
    return Gallery("text", bundle.pool, bundle.knn_k, embed, bundle.manifest.input_dims["text"])


@pytest.fixture(scope="module")
def split(wikipedia_bundle):
    bundle = load_bundle(wikipedia_bundle)
    rng = np.random.default_rng(7)
    n = 600
    ids = [f"item-{i:04d}" for i in range(n)]
    features = rng.normal(size=(n, bundle.manifest.input_dims["text"])).astype(np.float32)
    # Duplicated vectors: exact score ties, which must be broken by id in every split.
    features[300:320] = features[0:20]
    derived = derive(bundle, "text", features)
    metadata = [json.dumps({"colour": ["red", "blue", "green"][i % 3]}) for i in range(n)]
    whole = text_gallery(bundle)
    whole.put(ids, features, derived, metadata)
    shards = [text_gallery(bundle) for _ in range(N_SHARDS)]
    for s, shard in enumerate(shards):
        rows = [i for i, item_id in enumerate(ids) if shard_of(item_id, N_SHARDS) == s]
        shard.put(
            [ids[i] for i in rows],
            features[rows],
            type(derived)(derived.neighbours[rows], derived.weights[rows], derived.units[rows]),
            [metadata[i] for i in rows],
        )
    units = derive(bundle, "image", rng.normal(size=(25, bundle.manifest.input_dims["image"])))
    codes = bundle.codes(units.units)
    queries = QueryBatch(units.units, codes, query_profile(bundle.pool, codes))
    return whole, shards, queries


@pytest.mark.parametrize("similarity", ["knn", "cosine"])
@pytest.mark.parametrize("flt", [None, {"colour": "blue"}])
def test_merged_shards_rank_like_the_whole_gallery(split, similarity, flt):
    whole, shards, queries = split
    assert all(len(s) for s in shards) and sum(len(s) for s in shards) == len(whole)
    k = 40
    expected = whole.search_exact(queries, k, similarity, flt)
    parts = [shard.search_exact(queries, k, similarity, flt) for shard in shards]
    for q in range(len(queries)):
        merged = merge_hits([part[q] for part in parts], k)
        assert [h.id for h in merged] == [h.id for h in expected[q]]
        assert [h.score for h in merged] == [h.score for h in expected[q]]  # bitwise


def test_ties_are_broken_by_id_across_shards(split):
    whole, shards, queries = split
    hits = merge_hits([shard.search_exact(queries, 600, "cosine")[0] for shard in shards], 600)
    assert [h.id for h in hits] == [h.id for h in whole.search_exact(queries, 600, "cosine")[0]]
    by_score: dict[float, list[str]] = {}
    for h in hits:
        by_score.setdefault(h.score, []).append(h.id)
    tied = [ids for ids in by_score.values() if len(ids) > 1]
    assert tied, "the duplicated vectors must produce ties"
    assert all(ids == sorted(ids) for ids in tied)
