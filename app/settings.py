"""Service settings: every knob is an environment variable with the prefix CDPAE_.

`Settings()` reads the environment; `cdpae serve` flags override it. The README's
settings table lists the same fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.ann import AnnParams

# The approximate index's defaults are AnnParams' own: one place says what they are.
_ANN_DEFAULTS = AnnParams()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDPAE_", extra="ignore")

    bundle: Path = Field(Path("models/wikipedia"), description="bundle directory to serve")
    data_dir: Path = Field(Path("var"), description="where the gallery store (SQLite) lives")
    store: str | None = Field(
        None,
        description="postgresql://USER@HOST:PORT/DB: the gallery in PostgreSQL, shared by "
        "replicas; unset: the SQLite file under data_dir",
    )
    ray: str | None = Field(
        None,
        description="ADDRESS of a Ray cluster (host:port) to shard the galleries on, or `local` "
        "to start a one-node Ray; needs a postgresql:// store. Unset: one process",
    )
    shards: int = Field(4, ge=1, le=256, description="shard actors per modality (with ray)")
    shard_timeout_s: float = Field(
        5.0,
        gt=0,
        description="a shard that has not answered within this gets the request a 503 + "
        "Retry-After (with ray)",
    )
    host: str = Field("127.0.0.1", description="interface uvicorn binds to")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(None, description="if set, gallery writes need it")
    read_api_key: SecretStr | None = Field(
        None, description="if set, searches and gallery reads need it (or api_key)"
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="request bodies above this get 413"
    )
    max_inflight_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="request body bytes read and parsed at once (a body costs several times "
        "its size once parsed); beyond it: 503 + Retry-After",
    )
    max_batch: int = Field(256, ge=1, description="most query vectors in one search")
    max_upsert: int = Field(1000, ge=1, description="most items in one gallery upsert")
    max_top_k: int = Field(1000, ge=1, description="largest top_k a search may ask for")
    max_inflight: int = Field(
        64, ge=1, description="concurrent searches and writes; beyond it: 503 + Retry-After"
    )
    idle_trim_s: float = Field(
        2.0,
        ge=0,
        description="after this many seconds without a search or write, the heap that "
        "searches freed is given back to the OS (0: never)",
    )
    ann_min_items: int = Field(
        50_000,
        ge=0,
        description="knn and cosine searches without a filter use the approximate path from this "
        "gallery size on (0: never unless asked)",
    )
    ann_m: int = Field(
        _ANN_DEFAULTS.hnsw.M, ge=2, description="HNSW M of the gallery's approximate index"
    )
    ann_ef_construction: int = Field(
        _ANN_DEFAULTS.hnsw.ef_construction, ge=1, description="HNSW ef_construction"
    )
    ann_candidates: int = Field(
        _ANN_DEFAULTS.candidates,
        ge=1,
        description="first candidate list size of the approximate path",
    )
    ann_max_candidates: int = Field(
        _ANN_DEFAULTS.max_candidates,
        ge=1,
        description="candidate list cap while widening the approximate path",
    )
    ann_dim: int = Field(
        _ANN_DEFAULTS.dim,
        ge=0,
        description="the approximate index holds m_g projected on this many principal "
        "directions of the training pool (0: no projection)",
    )
    snapshots: bool = Field(
        True,
        description="keep each gallery's snapshot (arrays and ANN indexes) as local files, so a "
        "restart reads them and catches up instead of reloading from the store",
    )
    snapshot_dir: Path | None = Field(
        None, description="where the snapshots are written; unset: data_dir/snapshots"
    )
    seed_default_gallery: bool = Field(
        True, description="seed an empty store from the bundle's default gallery"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @property
    def snapshot_path(self) -> Path | None:
        """Where snapshots go, or None when they are off."""
        if not self.snapshots:
            return None
        return self.snapshot_dir or self.data_dir / "snapshots"

    def ann_params(self) -> AnnParams:
        """The galleries' approximate index settings: these knobs over AnnParams' defaults."""
        return AnnParams(
            hnsw=_ANN_DEFAULTS.hnsw.model_copy(
                update={"M": self.ann_m, "ef_construction": self.ann_ef_construction}
            ),
            candidates=self.ann_candidates,
            max_candidates=self.ann_max_candidates,
            dim=self.ann_dim,
        )

    @model_validator(mode="after")
    def _cluster_needs_postgres(self) -> Settings:
        # Shard actors reload their slices from the database: SQLite is one process's file.
        if self.ray and not (self.store or "").startswith(("postgresql://", "postgres://")):
            raise ValueError("ray needs store=postgresql://... (shards reload from it)")
        return self
