"""Per-token conditioning: noise level, clean/noisy flag and the physical time step Δt.

Which part of STAR-MD: the conditioning vector that drives AdaLN. Each token carries

- its noise level: the diffusion time t ∈ [0, 1] for noisy tokens and the context-noise level τ for
  clean tokens (Fourier features; one shared embedding, the flag tells them apart);
- a clean/noisy flag (one-hot);
- Δt in ns through Fourier features of log(Δt / 1 ns), so one model covers Δt from 0.01 to 10 ns
  (log Δt spans about -4.6..2.3 there).

Choices where the paper is silent: sinusoidal features with log-spaced angular frequencies
(0.5..500 rad per unit noise level, 0.1..10 rad per e-fold of Δt), followed by a two-layer SiLU
MLP to the model width. All tokens of one slot share a conditioning vector, so it is computed per
(batch, slot), shape (B, S, C), and broadcast over residues. With ``fixed_dt_ns`` the given Δt is
replaced by the fixed value (the "no Δt conditioning" ablation).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

__all__ = ["fourier_features", "Conditioning"]


def fourier_features(x: torch.Tensor, n_freq: int, min_freq: float, max_freq: float) -> torch.Tensor:
    """Sinusoidal features with log-spaced angular frequencies.

    Parameters
    ----------
    x : torch.Tensor, shape (...)
    n_freq : int
    min_freq, max_freq : float
        Angular frequencies (radians per unit of x) of the first and last feature.

    Returns
    -------
    torch.Tensor, shape (..., 2 * n_freq): [sin(f_k x), cos(f_k x)]
    """
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), n_freq, dtype=x.dtype, device=x.device))
    angles = x[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conditioning(nn.Module):
    """Conditioning vectors per (batch, slot).

    Parameters
    ----------
    config : ModelConfig
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n_in = 2 * config.time_fourier + 2 + 2 * config.dt_fourier
        self.mlp = nn.Sequential(nn.Linear(n_in, config.width), nn.SiLU(), nn.Linear(config.width, config.width))

    def forward(self, noise_level: torch.Tensor, noisy: torch.Tensor, dt_ns: torch.Tensor) -> torch.Tensor:
        """Conditioning vectors.

        Parameters
        ----------
        noise_level : torch.Tensor, shape (B, S)
            t for noisy slots, τ for clean slots, in [0, 1].
        noisy : torch.Tensor, shape (S,), bool
        dt_ns : torch.Tensor, shape (B,), ns
            Physical time between consecutive frames.

        Returns
        -------
        torch.Tensor, shape (B, S, C)
        """
        B, S = noise_level.shape
        dtype = self.mlp[0].weight.dtype
        if not bool((dt_ns > 0).all()):
            raise ValueError(f"dt_ns={dt_ns.tolist()} must be positive times in ns; pass the frame spacing, e.g. 0.1.")
        if self.config.fixed_dt_ns is not None:
            dt_ns = torch.full_like(dt_ns, self.config.fixed_dt_ns)
        c = self.config
        t_feat = fourier_features(noise_level.to(torch.float64), c.time_fourier, 0.5, 500.0)
        flag = torch.nn.functional.one_hot(noisy.long(), 2).to(torch.float64).expand(B, S, 2)
        dt_feat = fourier_features(torch.log(dt_ns.to(torch.float64)), c.dt_fourier, 0.1, 10.0)
        feats = torch.cat([t_feat, flag, dt_feat[:, None].expand(B, S, -1)], dim=-1)
        return self.mlp(feats.to(dtype))
