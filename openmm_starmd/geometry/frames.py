"""Residue frames <-> backbone atoms (N, CA, C, O).

STAR-MD represents each residue of each MD frame by a rigid transform T = (R, x) (its SE(3)
token); this module is the bridge between those frames and backbone atom positions, in both
directions. Everything is in nanometres and batched over any leading shape.

Frame convention (AlphaFold's backbone rigid group, also what FrameDiff ends up with):

* origin at CA;
* x-axis along C - CA;
* y-axis in the N-CA-C plane, on the side of N (Gram-Schmidt of N - CA against x);
* z = x cross y (right-handed).

So ``R`` has the three axes as columns and a local point p maps to ``R p + CA``.

Ideal geometry, where the paper is silent: the model only produces frames, so atoms are
rebuilt from one generic residue, AlphaFold's ``rigid_group_atom_positions['ALA']``
(``alphafold/common/residue_constants.py``, derived from Engh & Huber 1991), converted Å -> nm:

====  ==========================  =========================================
atom  local position (nm)         resulting geometry
====  ==========================  =========================================
N     (-0.0525,  0.1363, 0.0)     N-CA 0.1461 nm, N-CA-C 111.1 deg
CA    ( 0.0,     0.0,    0.0)
C     ( 0.1526,  0.0,    0.0)     CA-C 0.1526 nm
O     ( 0.0627,  0.1062, 0.0)     in AlphaFold's psi frame: C=O 0.1233 nm,
                                  CA-C=O 120.6 deg
====  ==========================  =========================================

Residue-specific ideal values (glycine, proline) differ from these by at most ~0.005 nm;
using one residue keeps the frame -> atom map independent of the sequence.

O is the one backbone atom a frame does not fix: it rotates with psi about the CA-C bond.
Two ways to place it, both with the fixed C=O length and CA-C=O angle above:

* from psi (:func:`oxygen_from_psi`): psi is the N-CA-C-N(i+1) torsion; O sits trans to
  N(i+1), i.e. torsion N-CA-C-O = psi + pi (AlphaFold's psi frame, which rotates the O of
  the table above about x by psi). :func:`psi_from_backbone` reads psi back from a real
  backbone through its own O, so it is defined for C-terminal residues too.
* from the next residue's frame (:func:`oxygen_from_next_frame`): psi is taken from the
  ideal N of frame i+1, which puts O in the peptide plane CA(i), C(i), N(i+1), opposite
  N(i+1). This needs no torsion output from the model.

:func:`backbone_from_frames` uses psi where given, otherwise the next frame within the same
chain, and for chain ends and breaks (no bonded next N) falls back to ``terminal_psi``,
default pi (the extended beta region; any value is a guess there and backmapping minimises
the O afterwards).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .rigid import Rigid, apply
from .so3 import rotation_from_two_vectors

__all__ = [
    "IDEAL_N_NM",
    "IDEAL_CA_NM",
    "IDEAL_C_NM",
    "IDEAL_O_PSI_FRAME_NM",
    "DEFAULT_TERMINAL_PSI",
    "PEPTIDE_BOND_CUTOFF_NM",
    "frames_from_backbone",
    "ideal_n_ca_c",
    "dihedral",
    "psi_from_backbone",
    "oxygen_from_psi",
    "oxygen_from_next_frame",
    "backbone_from_frames",
    "Idealization",
    "idealize_backbone",
]

# AlphaFold residue_constants.rigid_group_atom_positions['ALA'] (Engh & Huber), Å -> nm.
IDEAL_N_NM = (-0.0525, 0.1363, 0.0)
IDEAL_CA_NM = (0.0, 0.0, 0.0)
IDEAL_C_NM = (0.1526, 0.0, 0.0)
# O in AlphaFold's psi frame (origin C, x along CA->C, rotated about x by psi).
IDEAL_O_PSI_FRAME_NM = (0.0627, 0.1062, 0.0)

DEFAULT_TERMINAL_PSI = math.pi
# A C(i)-N(i+1) distance above this is a chain break, not a peptide bond (bond is 0.133 nm).
PEPTIDE_BOND_CUTOFF_NM = 0.2


def frames_from_backbone(
    n: torch.Tensor,
    ca: torch.Tensor,
    c: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> Rigid:
    """Residue frames from backbone atoms by Gram-Schmidt (see the module docstring).

    Parameters
    ----------
    n, ca, c : torch.Tensor, shape=(..., N_res, 3), nm
        Backbone N, CA and C positions.
    mask : torch.Tensor of bool, shape=(..., N_res), optional
        Residues whose three atoms are present. Masked-out residues get the identity
        rotation at their (possibly meaningless) CA, so no NaN leaks into a batch.

    Returns
    -------
    Rigid
        rots (..., N_res, 3, 3), trans (..., N_res, 3) in nm (trans = CA).
    """
    rots = rotation_from_two_vectors(c - ca, n - ca)
    trans = ca
    if mask is not None:
        eye = torch.eye(3, dtype=rots.dtype, device=rots.device).expand_as(rots)
        rots = torch.where(mask[..., None, None], rots, eye)
    return Rigid(rots, trans)


def _local(point_nm, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(point_nm, dtype=like.dtype, device=like.device)


def ideal_n_ca_c(frames: Rigid) -> torch.Tensor:
    """Ideal N, CA, C placed by each frame.

    Parameters
    ----------
    frames : Rigid
        rots (..., N_res, 3, 3), trans (..., N_res, 3), nm.

    Returns
    -------
    torch.Tensor, shape=(..., N_res, 3, 3), nm
        Atom axis -2 is (N, CA, C). Frames recomputed from these atoms equal ``frames``.
    """
    local = torch.stack(
        [_local(IDEAL_N_NM, frames.trans), _local(IDEAL_CA_NM, frames.trans), _local(IDEAL_C_NM, frames.trans)]
    )
    return apply(frames, local)


def dihedral(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Torsion angle a-b-c-d in (-pi, pi], IUPAC sign convention (as mdtraj and OpenMM).

    a, b, c, d : (..., 3) -> returns (...) radians.
    """
    b0, b1, b2 = b - a, c - b, d - c
    n1 = torch.cross(b0, b1, dim=-1)
    n2 = torch.cross(b1, b2, dim=-1)
    # atan2 of (|b1| b0.(b1 x b2), n1.n2) is accurate at every angle, unlike acos.
    y = b1.norm(dim=-1) * (b0 * n2).sum(-1)
    x = (n1 * n2).sum(-1)
    return torch.atan2(y, x)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.atan2(torch.sin(angle), torch.cos(angle))


def psi_from_backbone(backbone: torch.Tensor) -> torch.Tensor:
    """Backbone psi read through each residue's own O: psi = torsion(N, CA, C, O) - pi.

    For a planar peptide this equals the usual N-CA-C-N(i+1) torsion to within the
    out-of-plane wobble of O (a few degrees in crystal structures), and, unlike that
    torsion, it is defined for C-terminal residues.

    Parameters
    ----------
    backbone : torch.Tensor, shape=(..., N_res, 4, 3), nm
        N, CA, C, O positions.

    Returns
    -------
    torch.Tensor, shape=(..., N_res), radians in (-pi, pi]
    """
    n, ca, c, o = backbone.unbind(-2)
    return _wrap(dihedral(n, ca, c, o) - math.pi)


def oxygen_from_psi(frames: Rigid, psi: torch.Tensor) -> torch.Tensor:
    """Carbonyl O placed from each frame and its psi torsion.

    Parameters
    ----------
    frames : Rigid
        rots (..., N_res, 3, 3), trans (..., N_res, 3), nm.
    psi : torch.Tensor, shape=(..., N_res), radians
        N-CA-C-N(i+1) torsion; O is put at torsion N-CA-C-O = psi + pi.

    Returns
    -------
    torch.Tensor, shape=(..., N_res, 3), nm
    """
    psi = psi.to(frames.trans.dtype)
    ox, oy, _ = IDEAL_O_PSI_FRAME_NM
    # AlphaFold's psi frame in the residue frame: origin at C, axes (x, -y, -z). Rotating
    # its O about x by psi gives, in residue-frame coordinates:
    local = torch.stack(
        [
            torch.full_like(psi, IDEAL_C_NM[0] + ox),
            -oy * torch.cos(psi),
            -oy * torch.sin(psi),
        ],
        -1,
    )
    return apply(frames, local[..., None, :])[..., 0, :]


def oxygen_from_next_frame(frames: Rigid, next_frames: Rigid) -> torch.Tensor:
    """Carbonyl O in the peptide plane of the next residue's ideal N.

    Parameters
    ----------
    frames, next_frames : Rigid
        Frames of residues i and i+1, same batch shape (..., N_res).

    Returns
    -------
    torch.Tensor, shape=(..., N_res, 3), nm
    """
    return oxygen_from_psi(frames, _psi_to_next(frames, next_frames))


def _psi_to_next(frames: Rigid, next_frames: Rigid) -> torch.Tensor:
    n, ca, c = ideal_n_ca_c(frames).unbind(-2)
    next_n = apply(next_frames, _local(IDEAL_N_NM, next_frames.trans)[None])[..., 0, :]
    return dihedral(n, ca, c, next_n)


def _shift_next(x: torch.Tensor, res_dim: int) -> torch.Tensor:
    """x[i+1] along ``res_dim``; the last entry repeats itself (callers mask it)."""
    tail = x.narrow(res_dim, x.shape[res_dim] - 1, 1)
    return torch.cat([x.narrow(res_dim, 1, x.shape[res_dim] - 1), tail], res_dim)


def backbone_from_frames(
    frames: Rigid,
    psi: torch.Tensor | None = None,
    *,
    chain_index: torch.Tensor | None = None,
    terminal_psi: float = DEFAULT_TERMINAL_PSI,
    peptide_bond_cutoff_nm: float = PEPTIDE_BOND_CUTOFF_NM,
) -> torch.Tensor:
    """Ideal N, CA, C, O from residue frames.

    Parameters
    ----------
    frames : Rigid
        rots (..., N_res, 3, 3), trans (..., N_res, 3), nm; residues in chain order.
    psi : torch.Tensor, shape=(..., N_res), radians, optional
        Torsions to place every O with. If omitted, O goes in the peptide plane of the next
        residue's N where that residue follows in the same chain with C(i)-N(i+1) shorter
        than ``peptide_bond_cutoff_nm``, and at ``terminal_psi`` elsewhere.
    chain_index : torch.Tensor of int, shape=(N_res,) or (..., N_res), optional
        Chain of each residue; the last residue of a chain has no next residue.
    terminal_psi : float, radians
        psi for residues without a bonded next residue when ``psi`` is omitted.
    peptide_bond_cutoff_nm : float, nm
        Longest C(i)-N(i+1) distance still treated as a peptide bond.

    Returns
    -------
    torch.Tensor, shape=(..., N_res, 4, 3), nm
        Atom axis -2 is (N, CA, C, O).
    """
    n_ca_c = ideal_n_ca_c(frames)
    if psi is None:
        psi = _psi_from_neighbours(frames, n_ca_c, chain_index, terminal_psi, peptide_bond_cutoff_nm)
    o = oxygen_from_psi(frames, psi)
    return torch.cat([n_ca_c, o[..., None, :]], -2)


def _psi_from_neighbours(frames, n_ca_c, chain_index, terminal_psi, cutoff_nm):
    n_res = frames.trans.shape[-2]
    if n_res == 0:
        return frames.trans.new_zeros(frames.trans.shape[:-1])
    next_frames = Rigid(_shift_next(frames.rots, -3), _shift_next(frames.trans, -2))
    psi_next = _psi_to_next(frames, next_frames)
    next_n = _shift_next(n_ca_c[..., 0, :], -2)
    bonded = (next_n - n_ca_c[..., 2, :]).norm(dim=-1) < cutoff_nm
    has_next = torch.arange(n_res, device=frames.trans.device) < n_res - 1
    if chain_index is not None:
        chain_index = torch.as_tensor(chain_index, device=frames.trans.device)
        has_next = has_next & (_shift_next(chain_index, -1) == chain_index)
    use_next = bonded & has_next
    return torch.where(use_next, psi_next, torch.full_like(psi_next, terminal_psi))


class Idealization(NamedTuple):
    """A real backbone replaced by the ideal one its frames imply.

    frames : Rigid, batch shape (..., N_res), nm.
    backbone : (..., N_res, 4, 3) ideal N, CA, C, O in nm (O placed with the real psi).
    deviation : (..., N_res, 4) distance of each ideal atom from the real one, nm.
    rmsd : (..., 4) root-mean-square deviation per atom type over the masked residues, nm.
    """

    frames: Rigid
    backbone: torch.Tensor
    deviation: torch.Tensor
    rmsd: torch.Tensor


def idealize_backbone(backbone: torch.Tensor, mask: torch.Tensor | None = None) -> Idealization:
    """Frames of a real backbone, the ideal backbone they rebuild, and how far it moved.

    CA is reproduced exactly and C only moves along the CA-C bond, so the deviations measure
    how far the real bond lengths and N-CA-C angle (and, for O, the C=O length and CA-C=O
    angle) are from ideal. O is placed from the real psi, so psi itself costs nothing.

    Parameters
    ----------
    backbone : torch.Tensor, shape=(..., N_res, 4, 3), nm
        Real N, CA, C, O.
    mask : torch.Tensor of bool, shape=(..., N_res), optional
        Residues with all four atoms; others get identity frames and are left out of
        ``rmsd``.

    Returns
    -------
    Idealization
    """
    n, ca, c, _ = backbone.unbind(-2)
    frames = frames_from_backbone(n, ca, c, mask)
    ideal = backbone_from_frames(frames, psi_from_backbone(backbone))
    deviation = (ideal - backbone).norm(dim=-1)
    if mask is None:
        mask = torch.ones(deviation.shape[:-1], dtype=torch.bool, device=deviation.device)
    weights = mask[..., None].to(deviation.dtype)
    count = weights.sum(-2).clamp_min(1)
    rmsd = ((deviation * weights) ** 2).sum(-2).div(count).sqrt()
    return Idealization(frames, ideal, deviation, rmsd)
