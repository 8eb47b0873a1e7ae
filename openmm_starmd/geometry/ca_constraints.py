"""SHAKE-like bounds on the generated Cα trace: chain links and non-bonded contacts kept where MD keeps them.

Which part of STAR-MD: none; an addition of ours, off unless asked for (``AutoregressiveSampler(
ca_geometry=True)``; :class:`~openmm_starmd.integrator.StarMDIntegrator` turns it on by default).
The network places every residue frame independently up to its denoising error, so the distance
between consecutive Cα scatters (bundled model on 1GJS: 3.3–4.4 Å, mean 3.91, where MD keeps
3.61–4.08 Å, median 3.87) and the errors accumulate once generated frames become history: after
100 frames at 1 ns most frames have a "break" (> 4.19 Å) or a "clash" (two non-neighbouring Cα
< 3.0 Å). A molecular dynamics code would hold such virtual bonds with SHAKE; this module does the
analogue for the generated frame before it becomes history:

- every pair of consecutive residues of a chain (sequence numbers i, i+1, both present) is held in
  :data:`CHAIN_CA_RANGE_NM` = [0.360, 0.410] nm, the range seen in every frame of our reference MD
  (amber99sbildn + OBC, 13 trajectories, 1st–100th percentile 3.61–4.08 Å); a pair the starting
  structure has outside it keeps that distance as its bound (a cis peptide, ~2.9 Å), and a pair
  further apart than a peptide allows in the start (> 0.419 nm) is a genuine gap and is not held;
- every other pair of Cα is kept at least :data:`MIN_NONBONDED_CA_NM` = 0.35 nm apart (MD: 3.54 Å
  at the closest, in any frame), or at its starting distance when the start has it closer;
- extra pairs with their own bounds (disulfides: :data:`openmm_starmd.protein.DISULFIDE_CA_RANGE_NM`).

The projection moves translations only (rotations are kept): each sweep, every violated bound
asks its two residues to move along their Cα–Cα line by half the excess each, in opposite
directions, and each residue moves by the sum of what it is asked, divided by one plus the number
of held pairs it is in (a fixed Jacobi weight: stable where the plain sum overshoots, and
continuous in the positions, so the result does not depend on rounding). Sweeps stop when no bound is violated
by more than ``tol_nm`` or after ``max_sweeps``. A frame inside every bound is returned unchanged,
so MD frames pass through untouched. Built from distances and differences only, the projection
commutes with global rotations and translations. Only the non-bonded pairs near their bound are
followed sweep by sweep (:data:`CANDIDATE_MARGIN_NM`), all of them checked at the end:
``benchmarks/ca_projection_speed.py`` (0.5 Å of noise on every Cα, one thread) measured 4 / 8 / 25
ms per frame at N = 50 / 200 / 1000, 0.3–2 % of the network passes that make the frame, where
following every pair in every sweep took 6 / 75 / 1562 ms.

What it changes, and what it does not: it removes the model's chain breaks and Cα clashes and
stops their accumulation through the history; it cannot add what the model lacks (drift of the
fold, the time scale it moves at). Benchmarks report the model's own frames (before the
projection) next to the projected ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CHAIN_CA_RANGE_NM", "MIN_NONBONDED_CA_NM", "GAP_CA_NM", "CANDIDATE_MARGIN_NM", "CaConstraints",
           "build_ca_constraints", "project_ca"]

#: Consecutive Cα–Cα distance kept by the projection, nm (MD: 3.61–4.08 Å in every frame).
CHAIN_CA_RANGE_NM = (0.360, 0.410)
#: Closest approach of two Cα that are not chain neighbours, nm (MD: 3.54 Å at the closest).
MIN_NONBONDED_CA_NM = 0.350
#: A consecutive pair further apart than this in the starting structure is a gap, not a peptide bond.
GAP_CA_NM = 0.419


@dataclass
class CaConstraints:
    """Bounds for :func:`project_ca`, built by :func:`build_ca_constraints`.

    Attributes
    ----------
    pairs : torch.Tensor, shape (P, 2), long
        Held pairs (chain links and extra pairs); a residue may be in several.
    lo, hi : torch.Tensor, shape (P,), float64, nm
    min_nonbonded : torch.Tensor, shape (N, N), float64, nm
        Smallest allowed distance of every other pair (0 on the diagonal, for held pairs and for
        missing residues: no bound).
    max_sweeps : int
    tol_nm : float
    """

    pairs: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    min_nonbonded: torch.Tensor
    max_sweeps: int = 1000
    tol_nm: float = 1e-4


def build_ca_constraints(residue_index, chain_index, mask, reference_ca_nm, extra_pairs=None, extra_lo_nm=None,
                         extra_hi_nm=None, chain_range_nm=CHAIN_CA_RANGE_NM,
                         min_nonbonded_nm: float = MIN_NONBONDED_CA_NM) -> CaConstraints:
    """Bounds of the module docstring for one protein.

    Parameters
    ----------
    residue_index, chain_index : array-like of int, shape (N,)
        Residue numbers and 0-based chain indices.
    mask : array-like of bool, shape (N,), or None
        False for missing residues (in no bound).
    reference_ca_nm : array-like, shape (N, 3), nm
        The starting structure's Cα: decides gaps, cis peptides and contacts already closer than
        the non-bonded minimum.
    extra_pairs : array-like of int, shape (Q, 2), optional
        More held pairs (e.g. disulfides) with bounds ``extra_lo_nm`` / ``extra_hi_nm`` (scalars or (Q,)).
    chain_range_nm : (float, float)
    min_nonbonded_nm : float

    Returns
    -------
    CaConstraints
    """
    res = torch.as_tensor(residue_index, dtype=torch.long).reshape(-1)
    chain = torch.as_tensor(chain_index, dtype=torch.long).reshape(-1)
    N = res.numel()
    m = torch.ones(N, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
    ref = torch.as_tensor(reference_ca_nm, dtype=torch.float64).reshape(N, 3)
    if chain.numel() != N or m.numel() != N:
        raise ValueError(f"residue_index, chain_index and mask must all have N={N} entries.")
    if not bool(torch.isfinite(ref[m]).all()):
        raise ValueError("reference_ca_nm has NaN/Inf at present residues; pass the starting structure's Cα in nm.")
    lo_c, hi_c = float(chain_range_nm[0]), float(chain_range_nm[1])
    if not 0 < lo_c <= hi_c:
        raise ValueError(f"chain_range_nm={chain_range_nm} must be 0 < low <= high (nm).")
    i = torch.arange(N - 1)
    link = (chain[:-1] == chain[1:]) & (res[1:] - res[:-1] == 1) & m[:-1] & m[1:]
    d0 = torch.linalg.vector_norm(ref[1:] - ref[:-1], dim=-1)
    link &= d0 <= GAP_CA_NM
    pairs = torch.stack([i[link], i[link] + 1], dim=-1)
    lo = torch.minimum(torch.full((pairs.shape[0],), lo_c, dtype=torch.float64), d0[link])
    hi = torch.maximum(torch.full((pairs.shape[0],), hi_c, dtype=torch.float64), d0[link])
    if extra_pairs is not None and len(extra_pairs):
        ep = torch.as_tensor(extra_pairs, dtype=torch.long).reshape(-1, 2)
        elo = torch.as_tensor(extra_lo_nm, dtype=torch.float64).expand(ep.shape[0])
        ehi = torch.as_tensor(extra_hi_nm, dtype=torch.float64).expand(ep.shape[0])
        if bool((ep < 0).any() | (ep >= N).any()) or bool((ep[:, 0] == ep[:, 1]).any()):
            raise ValueError(f"extra_pairs {ep.tolist()} must join two different residues in 0..{N - 1}.")
        if bool(((elo <= 0) | (ehi < elo)).any()):
            raise ValueError("extra pair bounds need 0 < low <= high (nm).")
        pairs, lo, hi = torch.cat([pairs, ep]), torch.cat([lo, elo]), torch.cat([hi, ehi])
    d_ref = _pairwise(ref)
    minimum = torch.clamp(torch.minimum(torch.full_like(d_ref, float(min_nonbonded_nm)), d_ref), min=0.0)
    free = m[:, None] & m[None, :] & ~torch.eye(N, dtype=torch.bool)
    # residues next to each other in a chain are never "non-bonded", even across a gap, as in the
    # validity check (analysis.validity.ca_clashes)
    pos = torch.arange(N)
    same_chain_next = (chain[:, None] == chain[None, :]) & ((pos[:, None] - pos[None, :]).abs() == 1)
    free &= ~same_chain_next
    free[pairs[:, 0], pairs[:, 1]] = False
    free[pairs[:, 1], pairs[:, 0]] = False
    minimum = torch.where(free, minimum, torch.zeros_like(minimum))
    return CaConstraints(pairs=pairs, lo=lo, hi=hi, min_nonbonded=minimum)


#: Non-bonded pairs closer than their bound plus this margin when a projection starts are the only
#: ones it tracks sweep by sweep (residues move a few Å at most); every pair is checked when it
#: ends, and the list is rebuilt if one outside it was crossed. The result is what tracking every
#: pair would give, at O(N) instead of O(N²) work per sweep.
CANDIDATE_MARGIN_NM = 0.3


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """(..., N, N) distances computed pair by pair (``torch.cdist``'s default matrix-product form
    loses ~1e-4 nm in float32, as much as the projection's tolerance)."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _excess(x: torch.Tensor, pairs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Signed excess of each pair over its bounds (> 0 too long, < 0 too short, else 0), shape
    (..., P), with the pair vectors x_j - x_i (..., P, 3) and their lengths (..., P), nm."""
    d = x[..., pairs[:, 1], :] - x[..., pairs[:, 0], :]
    r = torch.linalg.vector_norm(d, dim=-1)
    return torch.where(r > hi, r - hi, torch.where(r < lo, r - lo, torch.zeros_like(r))), d, r


def _worst(x: torch.Tensor, c: CaConstraints) -> float:
    """Largest violation of any bound (held pairs and every non-bonded pair), nm."""
    held, _, _ = _excess(x, c.pairs.to(x.device), c.lo.to(x), c.hi.to(x))
    deficit = torch.clamp(c.min_nonbonded.to(x) - _pairwise(x), min=0.0)
    return max(float(held.abs().max()) if held.numel() else 0.0, float(deficit.max()) if deficit.numel() else 0.0)


def _tracked_pairs(x: torch.Tensor, c: CaConstraints,
                   margin_nm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held pairs plus the non-bonded pairs near their bound (in any batch element): (P, 2) pairs
    and (P,) lower and upper bounds, nm (no upper bound for non-bonded pairs)."""
    N = x.shape[-2]
    m = c.min_nonbonded.to(x)
    near = ((_pairwise(x) < m + margin_nm) & (m > 0)).reshape(-1, N, N).any(0)
    a, b = torch.nonzero(torch.triu(near, diagonal=1), as_tuple=True)
    pairs = torch.cat([c.pairs.to(x.device), torch.stack([a, b], dim=-1)])
    lo = torch.cat([c.lo.to(x), m[a, b]])
    hi = torch.cat([c.hi.to(x), torch.full_like(m[a, b], float("inf"))])
    return pairs, lo, hi


def project_ca(trans: torch.Tensor, constraints: CaConstraints,
               margin_nm: float = CANDIDATE_MARGIN_NM) -> tuple[torch.Tensor, dict]:
    """Move Cα positions (residue translations) into the bounds (module docstring).

    Parameters
    ----------
    trans : torch.Tensor, shape (..., N, 3), nm
    constraints : CaConstraints
    margin_nm : float
        Non-bonded pairs within this much of their bound are followed in every sweep
        (:data:`CANDIDATE_MARGIN_NM`); ``float("inf")`` follows every pair, the O(N²) reference form.

    Returns
    -------
    (torch.Tensor of the same shape, nm; dict with ``violation_before_nm`` and ``violation_after_nm``
    (largest violation of any bound), ``max_move_nm`` and ``sweeps``)
    """
    c = constraints
    x = trans
    tiny = torch.finfo(x.dtype).tiny
    held_i, held_j = c.pairs[:, 0].to(x.device), c.pairs[:, 1].to(x.device)
    # Jacobi weights: 1 / (1 + number of held pairs of the residue), fixed, so the update is a
    # continuous function of the positions (a weight that counted the bounds active in a sweep would
    # jump when one became active, and the result would then depend on rounding).
    degree = torch.zeros(x.shape[-2], dtype=x.dtype, device=x.device)
    degree.index_add_(0, held_i, torch.ones_like(held_i, dtype=x.dtype))
    degree.index_add_(0, held_j, torch.ones_like(held_j, dtype=x.dtype))
    weight = (1.0 / (1.0 + degree))[:, None]
    before = worst = _worst(x, c)
    sweeps = 0
    if worst > c.tol_nm:
        pairs, lo, hi = _tracked_pairs(x, c, margin_nm)
        rebuilds = 0
        while True:
            excess, d, r = _excess(x, pairs, lo, hi)
            if float(excess.abs().max()) <= c.tol_nm or sweeps == c.max_sweeps:
                worst = _worst(x, c)
                if worst <= c.tol_nm or sweeps == c.max_sweeps:
                    break
                rebuilds += 1
                if rebuilds > 10:  # cannot happen with exact distances; never loop forever
                    break
                pairs, lo, hi = _tracked_pairs(x, c, margin_nm)  # a pair outside the list was crossed
                continue
            # each violated pair asks its residues to move along their line by half the excess each
            step = 0.5 * excess[..., None] * d / r[..., None].clamp_min(tiny)
            move = torch.zeros_like(x)
            move.index_add_(-2, pairs[:, 0], step)
            move.index_add_(-2, pairs[:, 1], -step)
            x = x + move * weight
            sweeps += 1
    return x, {"violation_before_nm": before, "violation_after_nm": worst,
               "max_move_nm": float(torch.linalg.vector_norm(x - trans, dim=-1).max()) if x.numel() else 0.0,
               "sweeps": sweeps}
