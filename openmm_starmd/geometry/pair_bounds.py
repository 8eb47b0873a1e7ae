"""Keep chosen Cα–Cα distances inside bounds by moving residue frames rigidly.

Which part of STAR-MD: none; a physical constraint the network cannot know. STAR-MD has no pair
features and sees no side chains, so it does not know which cysteines are joined by a disulfide
bond; over long rollouts it pulls them apart (crambin: S–S 2.0 → 3.6–5.6 Å after backmapping,
energies 10⁴–10⁵ kJ/mol; benchmarks/RESULTS.md). The sampler therefore projects every generated
frame onto the set where each bonded pair's Cα–Cα distance lies in [d_min, d_max]: for a pair
outside, both residues translate along their Cα–Cα line by half the excess each, in opposite
directions (the pair's midpoint and every rotation are kept). This is the closest such frame set
in the sum of squared Cα moves when the pairs are disjoint (each cysteine is in one disulfide),
and it commutes with global rotations and translations.
"""
from __future__ import annotations

import torch

from .rigid import Rigid

__all__ = ["clamp_pair_distances", "check_pairs"]


def check_pairs(pairs, n_residues: int, d_min_nm, d_max_nm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (P, 2) long pairs and (P,) float64 bounds; raises ValueError naming the problem.

    The pairs must be disjoint (no residue in two pairs), within range, and 0 < d_min <= d_max.
    """
    p = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    lo = torch.as_tensor(d_min_nm, dtype=torch.float64).expand(p.shape[0]).clone()
    hi = torch.as_tensor(d_max_nm, dtype=torch.float64).expand(p.shape[0]).clone()
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n_residues):
        raise ValueError(f"pair residue indices must be in 0..{n_residues - 1}; got {p.tolist()}.")
    if bool((p[:, 0] == p[:, 1]).any()) or p.reshape(-1).unique().numel() != p.numel():
        raise ValueError(f"pairs {p.tolist()} must join two different residues and be disjoint (a residue in one pair).")
    if bool(((lo <= 0) | (hi < lo)).any()):
        raise ValueError(f"bounds need 0 < d_min <= d_max (nm); got {lo.tolist()} / {hi.tolist()}.")
    return p, lo, hi


def clamp_pair_distances(frames: Rigid, pairs: torch.Tensor, d_min_nm: torch.Tensor, d_max_nm: torch.Tensor) -> Rigid:
    """Frames whose paired Cα distances lie in [d_min, d_max] (module docstring).

    Parameters
    ----------
    frames : Rigid, batch shape (..., N), nm
    pairs : torch.Tensor, shape (P, 2), long, disjoint (see :func:`check_pairs`)
    d_min_nm, d_max_nm : torch.Tensor, shape (P,), nm

    Returns
    -------
    Rigid, same shape; rotations unchanged, only the paired residues' translations moved.
    """
    if pairs.numel() == 0:
        return frames
    x = frames.trans
    i, j = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
    d = x[..., j, :] - x[..., i, :]  # (..., P, 3)
    r = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    target = torch.minimum(torch.maximum(r, d_min_nm.to(x)[:, None]), d_max_nm.to(x)[:, None])
    shift = 0.5 * (r - target) * d / r.clamp_min(torch.finfo(x.dtype).tiny)
    out = x.clone()
    out[..., i, :] = x[..., i, :] + shift
    out[..., j, :] = x[..., j, :] - shift
    return Rigid(frames.rots, out)
