"""The CDPAE training loop (method.md, "Optimiser in the reference").

Each step draws two disjoint batches of objects (i and j) from a shuffled pass
over the training pairs, zeroes a fixed number of randomly chosen input
columns per modality (denoising), and takes one Adam step on the joint loss.
Every `eval_passes` passes the model is scored on validation (MAP@50, mean of
both directions, plain cosine); the best state is kept and training stops after
`patience` evaluations without improvement or `max_evals` evaluations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from app.retrieval import cosine_scores, mean_average_precision, unit_rows
from training.data import Split
from training.losses import (
    heterogeneous_loss,
    homogeneous_loss,
    joint_loss,
    pairwise_loss,
    reconstruction_loss,
    target_distance,
)
from training.model import CDPAE
from training.preprocess import Preprocessor, with_canonical_directions

# One thread: on a shared 2-core machine OpenMP barriers between two threads
# cost far more than they save (0.3 s per tiny step measured under load, vs ms).
TORCH_THREADS = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; the defaults are the reference's (method.md)."""

    common_dim: int = 1024
    hidden: tuple[int, ...] = ()
    lr: float = 1e-4
    batch_size: int = 64
    w1: float = 0.3
    w2: float = 0.001
    p_image: float = 0.5
    p_text: float = 0.7
    zscore_image: bool = True
    zscore_text: bool = False
    # Append each side's CCA coordinates (fitted on the training pairs) to the encoder input:
    # the same function class after export, other targets and gradients (preprocess.py).
    cca_inputs: bool = False
    # Where D_ij is measured: "input" = the features the encoders see (after any
    # z-scoring), "raw" = the features as stored in the data set.
    target_space: str = "input"
    weight_decay: float = 0.0  # declared but never applied in the reference: 0 there
    eval_passes: float = 10.0  # passes over the data between validation evaluations
    patience: int = 3
    max_evals: int = 60

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass
class EvalPoint:
    step: int
    epoch: float
    train_loss: dict[str, float]
    val_i2t: float
    val_t2i: float

    @property
    def val_mean(self) -> float:
        return (self.val_i2t + self.val_t2i) / 2


@dataclass
class TrainResult:
    config: TrainConfig
    seed: int
    model: CDPAE  # the best state on validation
    image_input: Preprocessor
    text_input: Preprocessor
    history: list[EvalPoint] = field(default_factory=list)
    best_index: int = -1
    steps: int = 0

    @property
    def best(self) -> EvalPoint:
        return self.history[self.best_index]

    @torch.no_grad()
    def embed(self, image: np.ndarray | None = None, text: np.ndarray | None = None) -> np.ndarray:
        """Common-space embeddings of raw features (exactly one of image / text)."""
        self.model.eval()
        if image is not None:
            x = torch.from_numpy(self.image_input(image))
            return self.model.image_encoder(x).numpy()
        assert text is not None
        return self.model.text_encoder(torch.from_numpy(self.text_input(text))).numpy()

    def train_embeddings(self, train: Split) -> np.ndarray:
        """The 2N pool: N image embeddings, then the N text embeddings."""
        return np.vstack([self.embed(image=train.image), self.embed(text=train.text)])


def cosine_map(
    image_units: np.ndarray, text_units: np.ndarray, labels: np.ndarray, r: int | None = 50
) -> tuple[float, float]:
    """(image->text, text->image) MAP@r with plain cosine, gallery = the same split."""
    scores = cosine_scores(image_units, text_units)
    return (
        mean_average_precision(scores, labels, labels, r),
        mean_average_precision(scores.T, labels, labels, r),
    )


def _zero_columns(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Set round(fraction * d) randomly chosen columns to 0, the rest unchanged."""
    d = x.shape[1]
    n_zero = min(d - 1, round(fraction * d)) if d > 1 else 0
    if n_zero <= 0:
        return x
    columns = torch.randperm(d, generator=generator)[:n_zero]
    out = x.clone()
    out[:, columns] = 0.0
    return out


def train_cdpae(
    config: TrainConfig,
    train: Split,
    validation: Split,
    *,
    seed: int = 0,
    progress: bool = False,
    description: str = "train",
    keep_best: bool = True,
) -> TrainResult:
    """Train one model with early stopping on validation, keeping the best state.

    keep_best=False trains for exactly `max_evals` evaluation periods and keeps the
    last state: the refit on train + validation, where validation is no longer held out.
    """
    if validation.labels is None:
        raise ValueError("validation needs labels: model selection ranks by category")
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)

    image_input = Preprocessor.fit(train.image, config.zscore_image)
    text_input = Preprocessor.fit(train.text, config.zscore_text)
    if config.cca_inputs:
        image_input, text_input = with_canonical_directions(
            image_input, text_input, train.image, train.text
        )
    images = torch.from_numpy(image_input(train.image))
    texts = torch.from_numpy(text_input(train.text))
    if config.target_space == "raw":
        target_images, target_texts = torch.from_numpy(train.image), torch.from_numpy(train.text)
    elif config.target_space == "input":
        target_images, target_texts = images, texts
    else:
        raise ValueError(f"target_space must be 'input' or 'raw', got {config.target_space!r}")
    val_images = torch.from_numpy(image_input(validation.image))
    val_texts = torch.from_numpy(text_input(validation.text))

    model = CDPAE(images.shape[1], texts.shape[1], config.common_dim, config.hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    n = len(train)
    batch = max(1, min(config.batch_size, n // 2))
    steps_per_pass = max(1, n // (2 * batch))
    eval_every = max(1, round(config.eval_passes * n / (2 * batch)))
    max_steps = eval_every * config.max_evals

    result = TrainResult(config, seed, model, image_input, text_input)
    best_score, best_state, since_best = -math.inf, None, 0
    sums: dict[str, float] = {}
    order = rng.permutation(n)
    bar = tqdm(total=max_steps, desc=description, disable=not progress, leave=False, unit="step")
    for step in range(1, max_steps + 1):
        slot = (step - 1) % steps_per_pass
        if slot == 0 and step > 1:
            order = rng.permutation(n)
        rows = order[slot * 2 * batch : (slot + 1) * 2 * batch]
        i_rows, j_rows = torch.from_numpy(rows[:batch]), torch.from_numpy(rows[batch:])
        terms = _step(
            model,
            optimiser,
            config,
            (images, texts),
            (target_images, target_texts),
            i_rows,
            j_rows,
            generator,
        )
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.update(1)

        if step % eval_every == 0:
            model.eval()
            with torch.no_grad():
                h_v, h_t = model.encode(val_images, val_texts)
            model.train()
            i2t, t2i = cosine_map(unit_rows(h_v.numpy()), unit_rows(h_t.numpy()), validation.labels)
            point = EvalPoint(
                step=step,
                epoch=step / steps_per_pass,
                train_loss={k: v / eval_every for k, v in sums.items()},
                val_i2t=i2t,
                val_t2i=t2i,
            )
            sums = {}
            result.history.append(point)
            bar.set_postfix(val_map50=f"{point.val_mean:.3f}")
            if not keep_best:  # the refit: nothing is held out, the last state is served
                result.best_index = len(result.history) - 1
                continue
            if point.val_mean > best_score:
                best_score, since_best = point.val_mean, 0
                best_state = copy.deepcopy(model.state_dict())
                result.best_index = len(result.history) - 1
            else:
                since_best += 1
            if since_best >= config.patience:
                break
    bar.close()
    result.steps = step
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def _step(
    model: CDPAE,
    optimiser: torch.optim.Optimizer,
    config: TrainConfig,
    inputs: tuple[torch.Tensor, torch.Tensor],
    target_inputs: tuple[torch.Tensor, torch.Tensor],
    i_rows: torch.Tensor,
    j_rows: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, float]:
    images, texts = inputs
    v_i, t_i, v_j, t_j = images[i_rows], texts[i_rows], images[j_rows], texts[j_rows]
    # One random column subset per modality per step, shared by objects i and j.
    both_v = _zero_columns(torch.cat([v_i, v_j]), config.p_image, generator)
    both_t = _zero_columns(torch.cat([t_i, t_j]), config.p_text, generator)
    h_v, h_t = model.encode(both_v, both_t)
    r_v, r_t = model.decode(h_v, h_t)
    b = v_i.shape[0]
    h_vi, h_vj, h_ti, h_tj = h_v[:b], h_v[b:], h_t[:b], h_t[b:]
    raw_v, raw_t = target_inputs
    target = target_distance(raw_v[i_rows], raw_t[i_rows], raw_v[j_rows], raw_t[j_rows])
    terms = joint_loss(
        pairwise_loss(h_vi, h_ti, h_vj, h_tj),
        heterogeneous_loss(h_vi, h_ti, h_vj, h_tj, target),
        homogeneous_loss(h_vi, h_ti, h_vj, h_tj, target),
        reconstruction_loss([r_v[:b], r_t[:b], r_v[b:], r_t[b:]], [v_i, t_i, v_j, t_j]),
        config.w1,
        config.w2,
    )
    optimiser.zero_grad(set_to_none=True)
    terms.total.backward()
    optimiser.step()
    return terms.as_floats()
