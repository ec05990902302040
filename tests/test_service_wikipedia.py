"""MAP@50 from the service's own HTTP responses equals what `cdpae evaluate` reports.

The Wikipedia bundle is the session's `wikipedia_bundle` fixture (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.ranking import evaluate_metrics, map_at_50
from tests.support.service import service

pytestmark = pytest.mark.slow


def test_service_map_equals_cdpae_evaluate(wikipedia_bundle, tmp_path):
    reported = evaluate_metrics(wikipedia_bundle)
    with np.load(wikipedia_bundle / "default_gallery.npz") as gallery:
        image, text, categories = gallery["image"], gallery["text"], gallery["categories"]
    assert len(categories) == 693  # the whole Wikipedia test split
    with service(wikipedia_bundle, tmp_path / "data") as client:
        for similarity, name in [("knn", "cdpae_knn"), ("cosine", "cdpae_cosine")]:
            i2t = map_at_50(client, "/search/image-to-text", image, categories, similarity)
            t2i = map_at_50(client, "/search/text-to-image", text, categories, similarity)
            assert round(i2t, 3) == round(reported[name]["i2t_map50"], 3)
            assert round(t2i, 3) == round(reported[name]["t2i_map50"], 3)
            assert round((i2t + t2i) / 2, 3) == round(reported[name]["mean_map50"], 3)
