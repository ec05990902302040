"""MAP@50 from the service's own HTTP responses equals what `cdpae evaluate` reports.

The Wikipedia bundle is conftest.py's `wikipedia_bundle` (trained once per session).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.support.service import service

pytestmark = pytest.mark.slow


def _map_at_50(client, url: str, queries: np.ndarray, labels: np.ndarray, similarity: str):
    aps = []
    for start in range(0, len(queries), 256):
        batch = queries[start : start + 256]
        body = {"vectors": batch.tolist(), "top_k": 50, "similarity": similarity, "mode": "exact"}
        response = client.post(url, json=body)
        assert response.status_code == 200, response.text
        for label, result in zip(labels[start:], response.json()["results"], strict=False):
            relevant = np.array([h["metadata"]["category"] == label for h in result["hits"]])
            precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
            aps.append((precision * relevant).sum() / relevant.sum() if relevant.any() else 0.0)
    return float(np.mean(aps))


def test_service_map_equals_cdpae_evaluate(wikipedia_bundle, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "evaluate",
            "--bundle",
            str(wikipedia_bundle),
            "--data",
            "wikipedia",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    reported = json.loads(run.stdout)["metrics"]
    with np.load(wikipedia_bundle / "default_gallery.npz") as gallery:
        image, text, categories = gallery["image"], gallery["text"], gallery["categories"]
    assert len(categories) == 693  # the whole Wikipedia test split
    with service(wikipedia_bundle, tmp_path / "data") as client:
        for similarity, name in [("knn", "cdpae_knn"), ("cosine", "cdpae_cosine")]:
            i2t = _map_at_50(client, "/search/image-to-text", image, categories, similarity)
            t2i = _map_at_50(client, "/search/text-to-image", text, categories, similarity)
            assert round(i2t, 3) == round(reported[name]["i2t_map50"], 3)
            assert round(t2i, 3) == round(reported[name]["t2i_map50"], 3)
            assert round((i2t + t2i) / 2, 3) == round(reported[name]["mean_map50"], 3)
