"""The CDPAE network: two encoders into one common space, two linear decoders.

The "four parallel autoencoders" of the paper are this one module applied to
objects i and j: the two image autoencoders share parameters, as do the two
text autoencoders, so one encoder/decoder per modality is all there is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.export import EncoderWeights
from training.preprocess import Preprocessor


def _encoder(d_in: int, hidden: tuple[int, ...], common_dim: int) -> nn.Sequential:
    """tanh(W x + a) layers: d_in -> hidden... -> common_dim (a single layer in the reference)."""
    layers: list[nn.Module] = []
    width = d_in
    for out in (*hidden, common_dim):
        layers += [nn.Linear(width, out), nn.Tanh()]
        width = out
    return nn.Sequential(*layers)


class CDPAE(nn.Module):
    def __init__(
        self, image_dim: int, text_dim: int, common_dim: int, hidden: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        self.image_encoder = _encoder(image_dim, hidden, common_dim)
        self.text_encoder = _encoder(text_dim, hidden, common_dim)
        # Linear decoders G(h) = U h + b back to each (preprocessed) input space.
        self.image_decoder = nn.Linear(common_dim, image_dim)
        self.text_decoder = nn.Linear(common_dim, text_dim)

    def encode(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_encoder(image), self.text_encoder(text)

    def decode(
        self, h_image: torch.Tensor, h_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_decoder(h_image), self.text_decoder(h_text)


def encoder_weights(encoder: nn.Sequential, preprocessor: Preprocessor) -> EncoderWeights:
    """A trained torch encoder plus its preprocessing, as export.EncoderWeights.

    Appended canonical coordinates are folded into the first layer: with
    W = [W_z, W_c] over the input [z, (z - centre) @ D],
    W [z, (z - centre) @ D] + b = (W_z + W_c D^T) z + (b - W_c D^T centre).
    """
    layers = [
        (
            module.weight.detach().cpu().numpy().astype(np.float64),
            module.bias.detach().cpu().numpy().astype(np.float64),
        )
        for module in encoder
        if isinstance(module, nn.Linear)
    ]
    if preprocessor.canonical is not None:
        weight, bias = layers[0]
        d = preprocessor.mean.shape[0]
        folded = weight[:, d:] @ preprocessor.canonical.directions.T.astype(np.float64)
        layers[0] = (
            weight[:, :d] + folded,
            bias - folded @ preprocessor.canonical.centre.astype(np.float64),
        )
    return EncoderWeights(
        mean=np.asarray(preprocessor.mean, dtype=np.float32),
        scale=np.asarray(preprocessor.scale, dtype=np.float32),
        layers=[(w.astype(np.float32), b.astype(np.float32)) for w, b in layers],
    )
