"""2D rotary position embedding (RoPE) over (residue index, frame index).

Which part of STAR-MD: the paper's 2D RoPE on the scalar queries and keys of the joint
spatio-temporal attention, so attention logits depend on the *relative* residue offset and the
*relative* frame offset of two tokens only, never on absolute positions.

Choices where the paper is silent:
- The head dimension d is split in two halves: the first d/2 channels rotate with the residue
  position, the last d/2 with the frame index, as d/4 (x_even, x_odd) pairs each.
- Residue position = residue_index + chain_offset * chain_index, so residues of different chains sit
  far apart on the residue axis (on top of the chain embedding); see ``ModelConfig.chain_offset``.
- Angles are formed in float64 and only their cos/sin cast to the working dtype: absolute frame
  indices grow without bound in a long rollout, and position * frequency in float32 would lose the
  phase (e.g. at position 10^5 a float32 angle is off by ~10^-2 rad).
"""
from __future__ import annotations

import torch

__all__ = ["rope_angles", "rope_tables", "apply_rope"]


def rope_angles(positions: torch.Tensor, n_pairs: int, base: float) -> torch.Tensor:
    """Rotation angles of ``n_pairs`` frequencies at integer positions.

    Parameters
    ----------
    positions : torch.Tensor, shape (...), integer or float
    n_pairs : int
        Number of frequencies; wavelengths go geometrically from 2π to 2π·base.
    base : float

    Returns
    -------
    torch.Tensor, shape (..., n_pairs), float64, radians
    """
    i = torch.arange(n_pairs, dtype=torch.float64, device=positions.device)
    inv_freq = base ** (-i / n_pairs)
    return positions.to(torch.float64)[..., None] * inv_freq


def rope_tables(
    residue_angles: torch.Tensor, frame_angles: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for tokens laid out as (batch, slots, residues).

    Parameters
    ----------
    residue_angles : torch.Tensor, shape (B, N, d/4), float64
        From :func:`rope_angles` of the residue positions.
    frame_angles : torch.Tensor, shape (S, d/4), float64
        From :func:`rope_angles` of the slot frame indices.
    dtype : torch.dtype
        Working dtype of the returned tables.

    Returns
    -------
    cos, sin : torch.Tensor, shape (B, S, N, d/2)
    """
    B, N, q = residue_angles.shape
    S = frame_angles.shape[0]
    angles = torch.cat(
        [residue_angles[:, None].expand(B, S, N, q), frame_angles[None, :, None].expand(B, S, N, q)], dim=-1
    )
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` by the tabulated angles.

    Parameters
    ----------
    x : torch.Tensor, shape (..., d)
    cos, sin : torch.Tensor, shape broadcastable to (..., d/2)

    Returns
    -------
    torch.Tensor, shape (..., d)
    """
    pairs = x.unflatten(-1, (-1, 2))
    xe, xo = pairs[..., 0], pairs[..., 1]
    return torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1).flatten(-2)
