"""Plots a person looks at (matplotlib, Agg): written into the bundle's plots/."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in tests

import matplotlib.pyplot as plt
import numpy as np

from training.evaluate import ROWS, Evaluation, precision_recall_curve
from training.selection import Selection

DPI = 90
# t-SNE on every test item would dominate the training time budget; a fixed
# random subset of pairs shows the same structure.
TSNE_MAX_PAIRS = 300


def plot_training(selection: Selection, path: Path) -> None:
    """Loss terms of the winner and validation MAP@50 (cosine) of every candidate."""
    winner = selection.winner
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    history = winner.result.history
    steps = [p.step for p in history]
    config = winner.candidate.config
    weights = {"total": 1.0, "pair": 1.0, "het": config.w1, "hom": config.w1, "rec": config.w2}
    for key, weight in weights.items():
        label = key if weight == 1.0 else f"{weight:g} x {key}"
        ax_loss.plot(steps, [weight * p.train_loss[key] for p in history], label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (mean since last evaluation)")
    ax_loss.set_title(f"losses: {winner.candidate.name}")
    ax_loss.legend(fontsize=8)
    for res in selection.results:
        line = ax_val.plot(
            [p.step for p in res.result.history],
            [p.val_mean for p in res.result.history],
            label=res.candidate.name,
            lw=2.5 if res is winner else 1.0,
        )[0]
        best = res.result.best
        ax_val.plot(best.step, best.val_mean, "o", color=line.get_color())
    ax_val.set(xlabel="step", ylabel="validation MAP@50 (cosine, mean of directions)")
    ax_val.set_title("validation curves (dot = kept state)")
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_knn_k(selection: Selection, cca_table: dict[int, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in selection.results:
        ks = sorted(res.knn_table)
        ax.plot(
            ks,
            [res.knn_table[k] for k in ks],
            marker=".",
            label=res.candidate.name,
            lw=2.5 if res is selection.winner else 1.0,
        )
    ks = sorted(cca_table)
    ax.plot(ks, [cca_table[k] for k in ks], "k--", marker=".", label="CCA + kNN")
    ax.set_xscale("log")
    ax.set(xlabel="k (nearest training items)", ylabel="validation MAP@50 (kNN similarity)")
    ax.set_title("choosing k on validation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_precision_recall(evaluation: Evaluation, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = evaluation.labels
    for ax, direction, title in ((axes[0], 0, "image -> text"), (axes[1], 1, "text -> image")):
        for row in ROWS:
            recall, precision = precision_recall_curve(
                evaluation.scores[row][direction], labels, labels
            )
            ax.plot(recall, precision, marker=".", label=row)
        ax.set(xlabel="recall", title=f"{title} ({evaluation.split})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("interpolated precision")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_tsne(evaluation: Evaluation, class_names: np.ndarray, path: Path, seed: int = 0) -> None:
    """t-SNE of the common space: colour = category, marker = modality (the paper's figure)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    n = len(evaluation.labels)
    rows = np.sort(rng.permutation(n)[:TSNE_MAX_PAIRS])
    points = np.vstack([evaluation.image_units[rows], evaluation.text_units[rows]])
    reduced = PCA(n_components=min(50, *points.shape), random_state=seed).fit_transform(points)
    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        reduced
    )
    labels = evaluation.labels[rows]
    m = len(rows)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for label in np.unique(labels):
        colour = cmap(int(label) % cmap.N)
        mask = labels == label
        ax.scatter(
            xy[:m][mask, 0],
            xy[:m][mask, 1],
            color=colour,
            marker="o",
            s=14,
            label=str(class_names[label]),
        )
        ax.scatter(xy[m:][mask, 0], xy[m:][mask, 1], color=colour, marker="^", s=14)
    ax.set_title("t-SNE of the common space (o image, ^ text)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
