"""The networks: a masked autoencoder over tabular star features, and a quantile head.

Inputs are scaled feature values ``x`` of shape ``(batch, n_features)`` (NaN where missing) and a
boolean ``hidden`` mask of the same shape (True where the entry is masked on purpose). Missing and
hidden entries are treated alike: their value is replaced by a learned per-feature "missing"
embedding (no sentinel number ever goes through the periodic embeddings), and a 0/1 indicator
channel per feature (``indicators``) tells the encoder which entries it did not see. With
``raw_inputs`` the scaled values themselves (0 where unseen) also enter the first layer beside
their embeddings: a linear path on which differences of inputs (colours from magnitudes) are one
weight away, where through low-frequency periodic embeddings they are faint.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rtdl_num_embeddings import PeriodicEmbeddings
from torch import nn

ACTIVATIONS = {"elu": nn.ELU, "gelu": nn.GELU, "relu": nn.ReLU}
NORMS = {"layernorm": nn.LayerNorm, "batchnorm": nn.BatchNorm1d}


def _check_choice(kind: str, value: str, options: dict) -> None:
    if value not in options:
        raise ValueError(f"model.{kind}: {value!r} is not one of {sorted(options)}")


class ResidualBlock(nn.Module):
    """Linear → norm → activation → dropout → Linear → norm, plus a (projected) skip connection."""

    def __init__(self, d_in: int, d_out: int, norm: str, activation: str, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(d_in, d_out), NORMS[norm](d_out), ACTIVATIONS[activation](), nn.Dropout(dropout),
            nn.Linear(d_out, d_out), NORMS[norm](d_out),
        )
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        self.out_activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_activation(self.skip(x) + self.body(x))


def residual_stack(d_in: int, widths: list[int], norm: str, activation: str, dropout: float) -> nn.Sequential:
    blocks, d = [], d_in
    for w in widths:
        blocks.append(ResidualBlock(d, w, norm, activation, dropout))
        d = w
    return nn.Sequential(*blocks)


class MaskedAutoencoder(nn.Module):
    """Encoder: periodic embeddings + indicator channels → residual MLP → latent.
    Decoder: residual MLP → linear reconstruction of the ``n_reconstruct`` target features.

    With ``n_label_targets`` > 0 a linear ``label_head`` reads the latent too (target-aware
    pretraining: the scaled labels of the stars that have them are targets beside the hidden
    inputs). It is linear on purpose: what it learns must be in the latent itself, where a
    fine-tuning head or a linear probe finds it, not in a deeper head of its own.
    """

    def __init__(
        self,
        n_features: int,
        n_reconstruct: int,
        d_embedding: int = 16,
        n_frequencies: int = 48,
        frequency_init_scale: float = 0.01,
        lite: bool = True,
        encoder_widths: list[int] = (512, 256, 128),
        decoder_widths: list[int] | None = None,
        norm: str = "layernorm",
        activation: str = "gelu",
        dropout: float = 0.0,
        indicators: bool = True,
        raw_inputs: bool = False,
        n_label_targets: int = 0,
    ):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        _check_choice("activation", activation, ACTIVATIONS)
        encoder_widths = list(encoder_widths)
        decoder_widths = list(reversed(encoder_widths[:-1])) if decoder_widths is None else list(decoder_widths)
        self.hparams = dict(
            n_features=n_features, n_reconstruct=n_reconstruct, d_embedding=d_embedding,
            n_frequencies=n_frequencies, frequency_init_scale=frequency_init_scale, lite=lite,
            encoder_widths=encoder_widths, decoder_widths=decoder_widths, norm=norm,
            activation=activation, dropout=dropout, indicators=indicators, raw_inputs=raw_inputs,
        )
        if n_label_targets:  # only then: older checkpoints' hparams stay valid as they are
            self.hparams["n_label_targets"] = int(n_label_targets)
        self.indicators, self.raw_inputs = bool(indicators), bool(raw_inputs)
        self.embed = PeriodicEmbeddings(
            n_features, d_embedding, n_frequencies=n_frequencies,
            frequency_init_scale=frequency_init_scale, lite=lite,
        )
        self.missing_embedding = nn.Parameter(torch.randn(n_features, d_embedding) * 0.02)
        # embeddings, then one indicator and one raw value per feature where enabled
        d_in = n_features * (d_embedding + int(self.indicators) + int(self.raw_inputs))
        self.encoder = residual_stack(d_in, encoder_widths, norm, activation, dropout)
        self.latent_dim = encoder_widths[-1]
        self.decoder = residual_stack(self.latent_dim, decoder_widths, norm, activation, dropout)
        d_dec = decoder_widths[-1] if decoder_widths else self.latent_dim
        self.reconstruct = nn.Linear(d_dec, n_reconstruct)
        self.label_head = nn.Linear(self.latent_dim, n_label_targets) if n_label_targets else None

    def drop_label_head(self) -> "MaskedAutoencoder":
        """The same model without its pretraining label head (a fine-tuned member's own head reads
        the latent): no unused parameters in every member, and hparams that rebuild it as it is."""
        self.label_head = None
        self.hparams.pop("n_label_targets", None)
        return self

    def encode(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Latent ``(batch, latent_dim)`` from values (NaN = missing) and the hidden mask."""
        unseen = hidden | torch.isnan(x)
        seen_x = torch.where(unseen, torch.zeros_like(x), x)
        emb = self.embed(seen_x)
        emb = torch.where(unseen.unsqueeze(-1), self.missing_embedding.to(emb.dtype), emb)
        parts = [emb.flatten(1)]
        if self.indicators:
            parts.append(unseen.to(emb.dtype))
        if self.raw_inputs:
            parts.append(seen_x.to(emb.dtype))
        return self.encoder(torch.cat(parts, dim=1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(self.decoder(latent))

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``(batch, n_reconstruct)`` and latent."""
        latent = self.encode(x, hidden)
        return self.decode(latent), latent


class QuantileHead(nn.Module):
    """MLP on the latent → (q16, q50, q84) per label, ordered by construction.

    Output shape ``(batch, n_labels, 3)``; the median is free, the lower and upper quantiles are
    the median minus / plus a softplus offset, so q16 ≤ q50 ≤ q84 always holds.

    With ``n_inputs`` > 0 the head also reads the encoder's inputs themselves (the seen scaled
    values, 0 where unseen, and a 0/1 unseen flag per feature) beside the latent: a wide-and-deep
    path, so a star's few photometric values reach the head without passing the bottleneck that
    pretraining shaped for spectra.
    """

    def __init__(self, latent_dim: int, n_labels: int, widths: list[int] = (128,),
                 norm: str = "layernorm", activation: str = "gelu", dropout: float = 0.0, n_inputs: int = 0):
        super().__init__()
        widths = list(widths)
        self.hparams = dict(latent_dim=latent_dim, n_labels=n_labels, widths=widths, norm=norm,
                            activation=activation, dropout=dropout, n_inputs=n_inputs)
        self.n_inputs = int(n_inputs)
        d_in = latent_dim + 2 * self.n_inputs
        self.body = residual_stack(d_in, widths, norm, activation, dropout)
        self.out = nn.Linear(widths[-1] if widths else d_in, n_labels * 3)
        self.n_labels = n_labels

    def forward(self, latent: torch.Tensor, x: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Quantiles from the latent; a head with ``n_inputs`` also needs the values ``x`` (NaN =
        missing) and the ``hidden`` mask that the encoder was given."""
        if self.n_inputs:
            if x is None or hidden is None:
                raise ValueError("this QuantileHead reads the inputs too: call head(latent, x, hidden)")
            unseen = hidden | torch.isnan(x)
            seen_x = torch.where(unseen, torch.zeros_like(x), x)
            latent = torch.cat([latent, seen_x.to(latent.dtype), unseen.to(latent.dtype)], dim=1)
        raw = self.out(self.body(latent)).view(-1, self.n_labels, 3)
        median = raw[..., 1]
        lower = median - F.softplus(raw[..., 0])
        upper = median + F.softplus(raw[..., 2])
        return torch.stack([lower, median, upper], dim=-1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
