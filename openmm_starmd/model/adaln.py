"""AdaLN-conditioned transformer layer: invariant point attention + transition MLP.

Which part of STAR-MD: the network block. Every layer is pre-norm with adaptive LayerNorm whose
shift, scale and gate come from the token's conditioning vector (noise level, clean/noisy flag,
Δt; see :mod:`openmm_starmd.model.conditioning`).

Choices where the paper is silent: the DiT "adaLN-Zero" form, x + gate * f(LN(x) * (1 + scale) +
shift), with the modulation projection initialised to zero so every layer starts as the identity
and the conditioning is learned from there; a GELU transition MLP; LayerNorm without its own affine
parameters (AdaLN supplies them). The modulation is computed per (batch, slot) and broadcast over
residues, because all tokens of one slot share their conditioning.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import InvariantPointAttention
from .config import ModelConfig

__all__ = ["AdaLNLayer", "modulate"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class AdaLNLayer(nn.Module):
    """One attention + transition layer of kind "joint", "frame" or "time".

    Parameters
    ----------
    config : ModelConfig
    kind : str
        Attention kind, which the attention context uses to choose the keys.
    """

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        C = config.width
        self.kind = kind
        self.norm_attn = nn.LayerNorm(C, elementwise_affine=False)
        self.norm_mlp = nn.LayerNorm(C, elementwise_affine=False)
        self.attention = InvariantPointAttention(C, config.heads, config.query_points, config.value_points)
        hidden = int(round(config.mlp_ratio * C))
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.GELU(), nn.Linear(hidden, C))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x, cond, rots, trans, cos, sin, context, index: int) -> torch.Tensor:
        """Update token features.

        Parameters
        ----------
        x : torch.Tensor, shape (B, S, N, C)
        cond : torch.Tensor, shape (B, S, C)
            Conditioning vectors.
        rots, trans : torch.Tensor, shapes (B, S, N, 3, 3) and (B, S, N, 3), nm
            Residue frames (translations relative to the attention origin).
        cos, sin : torch.Tensor, shape (B, S, N, d/2)
            RoPE tables.
        context : FullContext or CachedContext
            Chooses the keys each query sees.
        index : int
            This layer's position in the network (the cache is keyed by it).

        Returns
        -------
        torch.Tensor, shape (B, S, N, C)
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond)[:, :, None].chunk(6, dim=-1)
        h = modulate(self.norm_attn(x), shift_a, scale_a)
        q, k, v = self.attention.project(h, rots, trans, cos, sin)
        o = context.attend(index, self.kind, q, k, v)
        x = x + gate_a * self.attention.output(o, rots, trans)
        x = x + gate_m * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))
        return x
