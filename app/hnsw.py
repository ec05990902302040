"""HNSW graph parameters, and the one place an hnswlib index is made from them.

Two kinds of index use them: the bundle's training-pool index (space cosine; training.export
writes its parameters into manifest.json's "hnsw", app.bundle reads them back and sets their
values, TRAIN_INDEX_HNSW) and each gallery's approximate index (space l2 over lifted
projections; app.ann.AnnParams.hnsw holds its values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import hnswlib
from pydantic import BaseModel, ConfigDict, Field


class HnswParams(BaseModel):
    """The one description of an HNSW graph, for both the bundle's training index and each
    gallery's approximate index: its distance, how it is built and how wide it searches.

    No defaults: the two indexes want different values (app.bundle.TRAIN_INDEX_HNSW,
    app.ann.AnnParams), each written once where it is used.
    """

    model_config = ConfigDict(frozen=True)

    space: Literal["cosine", "l2"]
    M: int = Field(ge=2)  # links per node and layer (2M on the bottom layer)
    ef_construction: int = Field(ge=1)  # the beam while inserting
    ef: int = Field(ge=1)  # the search beam; the gallery's index raises it per query

    def searching_at_least(self, k: int) -> HnswParams:
        """These params with a beam of at least k: hnswlib can't return k neighbours with less."""
        return self if self.ef >= k else self.model_copy(update={"ef": k})

    def new_index(self, dim: int, max_elements: int, seed: int = 100) -> hnswlib.Index:
        """An empty index of room for max_elements vectors of dimension dim (seed: of the
        nodes' random levels; 100 is hnswlib's own default)."""
        index = hnswlib.Index(space=self.space, dim=dim)
        index.init_index(
            max_elements=max_elements,
            M=self.M,
            ef_construction=self.ef_construction,
            random_seed=seed,
        )
        index.set_ef(self.ef)
        return index

    def load_index(self, path: Path, dim: int, max_elements: int) -> hnswlib.Index:
        """The index hnswlib saved at path (its graph, so its M and ef_construction, are the
        file's), searching with beam ef. RuntimeError when hnswlib can't read it."""
        index = hnswlib.Index(space=self.space, dim=dim)
        index.load_index(str(path), max_elements=max_elements)
        index.set_ef(self.ef)
        return index
