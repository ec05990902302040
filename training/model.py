"""The CDPAE network: two encoders into one common space, two linear decoders.

The "four parallel autoencoders" of the paper are this one module applied to
objects i and j: the two image autoencoders share parameters, as do the two
text autoencoders, so one encoder/decoder per modality is all there is.

`members` > 1 trains that many independent CDPAEs side by side (each its own
weights, its own corruption and its own losses, averaged) and serves the
concatenation of their codes as the common space. Concatenated single-layer
encoders are again one `tanh(W x + a)` layer (W stacked), so the exported
encoder keeps the reference's form; cosine in the concatenated space is the
mean of the members' cosines when their codes have equal norms. Averaging
independent models this way cancels part of the seed-to-seed spread of one
model (docs/training.md).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import block_diag
from torch import nn

from training.export import EncoderWeights


class MemberLinear(nn.Module):
    """`members` independent linear layers applied at once: (M, n, in) -> (M, n, out)."""

    def __init__(self, members: int, d_in: int, d_out: int) -> None:
        super().__init__()
        # Each member initialised exactly as nn.Linear would be (members=1 matches it bit for bit).
        layers = [nn.Linear(d_in, d_out) for _ in range(members)]
        self.weight = nn.Parameter(torch.stack([layer.weight.data for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.data for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def _encoder(members: int, d_in: int, hidden: tuple[int, ...], common_dim: int) -> nn.Sequential:
    """tanh(W x + a) layers: d_in -> hidden... -> common_dim (a single layer in the reference)."""
    layers: list[nn.Module] = []
    width = d_in
    for out in (*hidden, common_dim):
        layers += [MemberLinear(members, width, out), nn.Tanh()]
        width = out
    return nn.Sequential(*layers)


class CDPAE(nn.Module):
    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        common_dim: int,
        hidden: tuple[int, ...] = (),
        members: int = 1,
    ) -> None:
        super().__init__()
        self.members = members
        self.image_encoder = _encoder(members, image_dim, hidden, common_dim)
        self.text_encoder = _encoder(members, text_dim, hidden, common_dim)
        # Linear decoders G(h) = U h + b back to each (preprocessed) input space.
        self.image_decoder = MemberLinear(members, common_dim, image_dim)
        self.text_decoder = MemberLinear(members, common_dim, text_dim)

    def encode_members(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member codes of per-member inputs: (M, n, d) -> (M, n, C)."""
        return self.image_encoder(image), self.text_encoder(text)

    def decode_members(
        self, h_image: torch.Tensor, h_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_decoder(h_image), self.text_decoder(h_text)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """The served common-space code of clean inputs: (n, d) -> (n, M * C)."""
        return _concatenate(self.image_encoder(_broadcast(image, self.members)))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return _concatenate(self.text_encoder(_broadcast(text, self.members)))


def _broadcast(x: torch.Tensor, members: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(members, -1, -1)


def _concatenate(h: torch.Tensor) -> torch.Tensor:
    """(M, n, C) -> (n, M * C), member 0's code first."""
    return h.permute(1, 0, 2).reshape(h.shape[1], -1)


def encoder_weights(encoder: nn.Sequential, mean: np.ndarray, scale: np.ndarray) -> EncoderWeights:
    """A trained encoder plus its z-scoring statistics, as export.EncoderWeights.

    The members' first layers stack into one (M * C_1, d) layer; deeper layers act
    on their own member's block only, so they become block-diagonal matrices.
    """
    layers = []
    for position, module in enumerate(m for m in encoder if isinstance(m, MemberLinear)):
        weights = module.weight.detach().cpu().numpy().astype(np.float32)
        bias = module.bias.detach().cpu().numpy().astype(np.float32).reshape(-1)
        weight = np.vstack(list(weights)) if position == 0 else block_diag(*weights)
        layers.append((weight.astype(np.float32), bias))
    return EncoderWeights(
        mean=np.asarray(mean, dtype=np.float32),
        scale=np.asarray(scale, dtype=np.float32),
        layers=layers,
    )
