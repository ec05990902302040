"""Model selection on the validation split (never the test split).

Every candidate configuration is trained (with the reference's early stopping
on validation), then the kNN similarity's k is swept on validation with the
candidate's own training pool. The winner is the candidate with the best
validation MAP@50 (mean of both directions) under the kNN similarity at its
best k: the similarity the service uses. Every candidate's numbers are kept
for the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from app.retrieval import TrainingPool, unit_rows
from training.data import Dataset
from training.evaluate import K_GRID, best_k, sweep_knn_k
from training.trainer import TrainConfig, TrainResult, train_cdpae

REFERENCE = TrainConfig()


@dataclass(frozen=True)
class Candidate:
    name: str
    config: TrainConfig


@dataclass
class CandidateResult:
    candidate: Candidate
    result: TrainResult
    knn_table: dict[int, float]  # k -> validation mean MAP@50 with the kNN similarity
    seconds: float

    @property
    def knn_k(self) -> int:
        return best_k(self.knn_table)

    @property
    def val_knn(self) -> float:
        return self.knn_table[self.knn_k]

    @property
    def val_cosine(self) -> float:
        return self.result.best.val_mean

    def summary(self) -> dict:
        best = self.result.best
        return {
            "name": self.candidate.name,
            "config": self.candidate.config.as_dict(),
            "val_cosine_i2t_map50": round(best.val_i2t, 6),
            "val_cosine_t2i_map50": round(best.val_t2i, 6),
            "val_cosine_mean_map50": round(best.val_mean, 6),
            "val_knn_mean_map50_by_k": {str(k): round(v, 6) for k, v in self.knn_table.items()},
            "knn_k": self.knn_k,
            "val_knn_mean_map50": round(self.val_knn, 6),
            "steps": self.result.steps,
            "best_step": best.step,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Selection:
    results: list[CandidateResult]

    @property
    def winner(self) -> CandidateResult:
        # Ties go to the earlier candidate: the grid lists the reference-like ones first.
        return max(self.results, key=lambda r: (r.val_knn, -self.results.index(r)))


def default_grid() -> list[Candidate]:
    """A small grid around the reference, chosen so the whole of `cdpae train` fits ~3 min.

    The reference (lr 1e-4) is included as is; the others use a larger step
    with more frequent validation, text z-scoring on and off, and lighter text
    corruption (p_text = 0.7 zeroes 7 of Wikipedia's 10 text dimensions).
    """
    fast = replace(REFERENCE, lr=1e-3, eval_passes=2.0)
    return [
        Candidate("reference", REFERENCE),
        Candidate("reference+text_z", replace(REFERENCE, zscore_text=True)),
        Candidate("lr1e-3", fast),
        Candidate("lr1e-3+text_z", replace(fast, zscore_text=True)),
        Candidate("lr1e-3+text_z+p_text0.2", replace(fast, zscore_text=True, p_text=0.2)),
        Candidate("lr1e-3+p_text0.2", replace(fast, p_text=0.2)),
    ]


def quick_grid() -> list[Candidate]:
    """One configuration, few evaluations: a real bundle in seconds (for service tests)."""
    return [
        Candidate(
            "quick",
            replace(REFERENCE, lr=1e-3, eval_passes=2.0, zscore_text=True, p_text=0.2, max_evals=6),
        )
    ]


def run_selection(
    dataset: Dataset,
    grid: Sequence[Candidate],
    *,
    seed: int = 0,
    k_grid: Sequence[int] = K_GRID,
    progress: bool = False,
) -> Selection:
    if dataset.validation.labels is None:
        raise ValueError("model selection needs validation labels")
    results = []
    outer = tqdm(grid, desc="selection", unit="config", disable=not progress)
    for candidate in outer:
        outer.set_postfix(config=candidate.name)
        start = time.perf_counter()
        trained = train_cdpae(
            candidate.config,
            dataset.train,
            dataset.validation,
            seed=seed,
            progress=progress,
            description=candidate.name,
        )
        pool = TrainingPool(unit_rows(trained.train_embeddings(dataset.train)))
        table = sweep_knn_k(
            pool,
            unit_rows(trained.embed(image=dataset.validation.image)),
            unit_rows(trained.embed(text=dataset.validation.text)),
            dataset.validation.labels,
            k_grid,
        )
        results.append(CandidateResult(candidate, trained, table, time.perf_counter() - start))
    return Selection(results)
