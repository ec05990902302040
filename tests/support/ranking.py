"""Retrieval quality from a service's HTTP answers, and what `cdpae evaluate` reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def map_at_50(client, url: str, queries: np.ndarray, labels: np.ndarray, similarity: str):
    """MAP@50 of the queries (batches of 256, mode exact) from the answers at `url`."""
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


def evaluate_metrics(bundle: Path) -> dict:
    """`cdpae evaluate --json`'s metrics for a Wikipedia bundle."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "evaluate",
            "--bundle",
            str(bundle),
            "--data",
            "wikipedia",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(run.stdout)["metrics"]
