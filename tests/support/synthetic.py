"""Small synthetic paired data and bundles for tests, built like the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.hnsw import HnswParams
from training.export import EncoderWeights, GalleryArrays, write_bundle


def make_pairs(n: int, d_img: int, d_txt: int, n_classes: int, rng: np.random.Generator):
    """Pairs whose image and text both depend on a shared class centre."""
    labels = rng.integers(0, n_classes, size=n)
    latent = rng.normal(size=(n_classes, 6))[labels] + 0.5 * rng.normal(size=(n, 6))
    img = np.abs(latent @ rng.normal(size=(6, d_img)) + 0.3 * rng.normal(size=(n, d_img)))
    txt = latent @ rng.normal(size=(6, d_txt)) + 0.3 * rng.normal(size=(n, d_txt))
    return img.astype(np.float32), txt.astype(np.float32), labels


def write_synthetic_npz(
    path: Path,
    *,
    n_train: int = 120,
    n_test: int = 40,
    d_img: int = 24,
    d_txt: int = 12,
    n_classes: int = 4,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    # Draw train and test together so they share class structure.
    img, txt, labels = make_pairs(n_train + n_test, d_img, d_txt, n_classes, rng)
    np.savez(
        path,
        img_train=img[:n_train],
        txt_train=txt[:n_train],
        label_train=labels[:n_train],
        img_test=img[n_train:],
        txt_test=txt[n_train:],
        label_test=labels[n_train:],
        id_train=np.array([f"tr-{i}" for i in range(n_train)]),
        id_test=np.array([f"te-{i}" for i in range(n_test)]),
        class_names=np.array([f"cat{i}" for i in range(n_classes)]),
    )
    return path


def random_encoder(d_in: int, d_out: int, rng: np.random.Generator) -> EncoderWeights:
    return EncoderWeights(
        mean=rng.normal(size=d_in).astype(np.float32) * 0.1,
        scale=rng.uniform(0.5, 2.0, size=d_in).astype(np.float32),
        layers=[
            (
                rng.normal(size=(d_out, d_in)).astype(np.float32) / np.sqrt(d_in),
                rng.normal(size=d_out).astype(np.float32) * 0.1,
            )
        ],
    )


def write_synthetic_bundle(
    out: Path,
    *,
    n_train: int = 60,
    n_gallery: int = 30,
    d_img: int = 16,
    d_txt: int = 8,
    common_dim: int = 12,
    knn_k: int = 5,
    n_classes: int = 3,
    seed: int = 0,
    hnsw: HnswParams | None = None,
) -> Path:
    """A bundle with random (untrained) encoders: every file real, the model not."""
    rng = np.random.default_rng(seed)
    image_encoder = random_encoder(d_img, common_dim, rng)
    text_encoder = random_encoder(d_txt, common_dim, rng)
    img, txt, _ = make_pairs(n_train, d_img, d_txt, n_classes, rng)
    g_img, g_txt, g_labels = make_pairs(n_gallery, d_img, d_txt, n_classes, rng)
    train_embeddings = np.vstack([image_encoder(img), text_encoder(txt)]).astype(np.float32)
    return write_bundle(
        out,
        dataset="synthetic",
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        train_embeddings=train_embeddings,
        gallery=GalleryArrays(
            ids=np.array([f"g-{i}" for i in range(n_gallery)]),
            categories=np.array([f"cat{label}" for label in g_labels]),
            image=g_img,
            text=g_txt,
        ),
        knn_k=knn_k,
        hnsw=hnsw,
        seed=seed,
    )
