"""Test-split evaluation: CDPAE (through the bundle, as served) against linear CCA.

The CDPAE rows go through `app.bundle.Bundle` exactly like the service:
ONNX encoders -> HNSW neighbours in the training pool -> `app.retrieval`
scoring -> MAP. CCA is fitted on the same training split; its kNN row uses the
same `app.retrieval` similarity over a pool of CCA-embedded training items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.bundle import Bundle
from app.retrieval import (
    ItemCodes,
    TrainingPool,
    cosine_scores,
    item_codes,
    knn_scores,
    mean_average_precision,
    unit_rows,
)
from training.baselines import CCA
from training.data import Dataset, Split

K_GRID: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 500, 1000)
ROWS = ("cdpae_knn", "cdpae_cosine", "cca", "cca_knn")
# manifest hyperparameters["trained_on"] of a model refitted on every non-test pair
TRAIN_PLUS_VALIDATION = "train+validation"

# (image->text scores, text->image scores) for one method
ScorePair = tuple[np.ndarray, np.ndarray]


def metrics_from_scores(scores: ScorePair, labels: np.ndarray) -> dict[str, float]:
    """MAP@50 and MAP over the full ranking, both directions and their mean."""
    i2t, t2i = scores
    out = {
        "i2t_map50": mean_average_precision(i2t, labels, labels, 50),
        "t2i_map50": mean_average_precision(t2i, labels, labels, 50),
        "i2t_map_all": mean_average_precision(i2t, labels, labels, None),
        "t2i_map_all": mean_average_precision(t2i, labels, labels, None),
    }
    out["mean_map50"] = (out["i2t_map50"] + out["t2i_map50"]) / 2
    out["mean_map_all"] = (out["i2t_map_all"] + out["t2i_map_all"]) / 2
    return {key: round(float(out[key]), 6) for key in sorted(out)}


def knn_score_pair(pool: TrainingPool, image: ItemCodes, text: ItemCodes) -> ScorePair:
    """kNN marginal similarity both ways: image queries vs text gallery and back, through
    app.retrieval.knn_scores, the service's own scoring steps: evaluated is served."""
    return knn_scores(pool, image, text), knn_scores(pool, text, image)


def exact_knn_score_pair(
    pool: TrainingPool, image_units: np.ndarray, text_units: np.ndarray, k: int
) -> ScorePair:
    """knn_score_pair with each item's k nearest training items found by brute force."""
    image = item_codes(pool, *pool.exact_neighbours(image_units, k))
    text = item_codes(pool, *pool.exact_neighbours(text_units, k))
    return knn_score_pair(pool, image, text)


def knn_and_cosine_map50(
    pool: TrainingPool, image_units: np.ndarray, text_units: np.ndarray, labels: np.ndarray, k: int
) -> tuple[float, float]:
    """(kNN similarity at k, plain cosine) mean MAP@50 of one split: the scripts' diagnosis."""
    knn = metrics_from_scores(exact_knn_score_pair(pool, image_units, text_units, k), labels)
    cosine = metrics_from_scores(cosine_score_pair(image_units, text_units), labels)
    return knn["mean_map50"], cosine["mean_map50"]


def cosine_score_pair(image_units: np.ndarray, text_units: np.ndarray) -> ScorePair:
    scores = cosine_scores(image_units, text_units)
    return scores, np.ascontiguousarray(scores.T)


Neighbours = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def sweep_knn_k(
    pool: TrainingPool,
    image_units: np.ndarray,
    text_units: np.ndarray,
    labels: np.ndarray,
    k_grid: Sequence[int] = K_GRID,
    neighbours: Neighbours | None = None,
) -> dict[int, float]:
    """Mean MAP@50 (both directions) of the kNN similarity for each k (capped at 2N)."""
    neighbours = neighbours or pool.exact_neighbours
    ks = sorted({min(k, pool.size) for k in k_grid})
    # One search at the largest k serves every smaller k: neighbours come best first.
    top = max(ks)
    img_ids, img_z = neighbours(image_units, top)
    txt_ids, txt_z = neighbours(text_units, top)
    table = {}
    for k in ks:
        image = item_codes(pool, img_ids[:, :k], img_z[:, :k])
        text = item_codes(pool, txt_ids[:, :k], txt_z[:, :k])
        table[k] = metrics_from_scores(knn_score_pair(pool, image, text), labels)["mean_map50"]
    return table


def best_k(table: dict[int, float]) -> int:
    """The k with the best validation score; ties go to the smaller k (cheaper to serve)."""
    return max(sorted(table), key=lambda k: table[k])


@dataclass(frozen=True)
class Evaluation:
    split: str
    knn_k: int
    cca_knn_k: int
    metrics: dict[str, dict[str, float]]
    scores: dict[str, ScorePair]  # per row, for precision-recall plots
    labels: np.ndarray
    image_units: np.ndarray  # CDPAE test embeddings through the bundle (for t-SNE)
    text_units: np.ndarray
    hnsw_recall: float  # recall@knn_k of the bundle's HNSW neighbours vs exact, on this split
    cca_k_table: dict[int, float]

    def as_json(self, dataset: str) -> dict:
        return {
            "dataset": dataset,
            "split": self.split,
            "knn_k": self.knn_k,
            "cca_knn_k": self.cca_knn_k,
            "hnsw_recall_at_k": round(self.hnsw_recall, 6),
            "metrics": {row: self.metrics[row] for row in ROWS},
        }


def hnsw_recall(bundle: Bundle, units: np.ndarray, k: int) -> float:
    """Mean recall@k of the HNSW neighbours against brute force."""
    approx, _ = bundle.neighbours(units, k)
    exact, _ = bundle.pool.exact_neighbours(units, k)
    hits = [len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits))


def _cca_pool(train: Split) -> tuple[CCA, TrainingPool]:
    cca = CCA.fit(train.image, train.text)
    units = np.vstack([cca.embed_image(train.image), cca.embed_text(train.text)])
    return cca, TrainingPool(unit_rows(units))


def cca_rows(
    train: Split,
    validation: Split,
    split: Split,
    k_grid: Sequence[int] = K_GRID,
    fit_on: Split | None = None,
) -> tuple[dict[str, ScorePair], int, dict[int, float]]:
    """CCA cosine and kNN scores on `split`, the same protocol as CDPAE's.

    k is chosen on `validation` with CCA fitted on `train`; the scored CCA is
    then fitted on `fit_on` (train + validation when CDPAE was refitted on it).
    """
    cca, pool = _cca_pool(train)
    assert validation.labels is not None
    table = sweep_knn_k(
        pool,
        unit_rows(cca.embed_image(validation.image)),
        unit_rows(cca.embed_text(validation.text)),
        validation.labels,
        k_grid,
    )
    k = best_k(table)
    if fit_on is not None:
        cca, pool = _cca_pool(fit_on)
    image_units = unit_rows(cca.embed_image(split.image))
    text_units = unit_rows(cca.embed_text(split.text))
    scores = {
        "cca": cosine_score_pair(image_units, text_units),
        "cca_knn": exact_knn_score_pair(pool, image_units, text_units, k),
    }
    return scores, k, table


def evaluate(bundle: Bundle, dataset: Dataset, split_name: str = "test") -> Evaluation:
    """All four rows on one split of `dataset`, the CDPAE rows through `bundle`."""
    split = dataset.test if split_name == "test" else dataset.validation
    if split.labels is None:
        raise ValueError(f"the {split_name} split has no labels; evaluation needs them")
    image_units = bundle.embed("image", split.image)
    text_units = bundle.embed("text", split.text)
    # The service's path: HNSW neighbours of each item, then the dense+sparse similarity.
    image_codes, text_codes = bundle.codes(image_units), bundle.codes(text_units)
    scores = {
        "cdpae_knn": knn_score_pair(bundle.pool, image_codes, text_codes),
        "cdpae_cosine": cosine_score_pair(image_units, text_units),
    }
    # CCA is fitted on the very pairs the bundle's model was trained on.
    refit = bundle.manifest.hyperparameters.get("trained_on") == TRAIN_PLUS_VALIDATION
    cca_scores, cca_k, cca_table = cca_rows(
        dataset.train,
        dataset.validation,
        split,
        fit_on=dataset.train_and_validation() if refit else None,
    )
    scores.update(cca_scores)
    recall = hnsw_recall(bundle, np.vstack([image_units, text_units]), bundle.knn_k)
    return Evaluation(
        split=split_name,
        knn_k=bundle.knn_k,
        cca_knn_k=cca_k,
        metrics={row: metrics_from_scores(scores[row], split.labels) for row in ROWS},
        scores=scores,
        labels=split.labels,
        image_units=image_units,
        text_units=text_units,
        hnsw_recall=recall,
        cca_k_table=cca_table,
    )


def precision_recall_curve(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, points: int = 21
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision at `points` recall levels, averaged over queries."""
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = gallery_labels[order] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    n_rel = np.maximum(relevant.sum(axis=1, keepdims=True), 1)
    precision = hits / np.arange(1, scores.shape[1] + 1)
    recall = hits / n_rel
    # Interpolated precision: the best precision at any recall >= r.
    best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    levels = np.linspace(0.0, 1.0, points)
    curve = np.empty(points)
    for i, r in enumerate(levels):
        reached = recall >= r - 1e-12
        first = np.argmax(reached, axis=1)
        curve[i] = best_after[np.arange(len(first)), first].mean()
    return levels, curve
