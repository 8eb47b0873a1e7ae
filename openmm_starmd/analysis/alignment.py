"""Cα selection and rigid superposition shared by every metric.

STAR-MD's evaluation (like AlphaFlow's and MDGen's on ATLAS) compares ensembles after removing
global rotation and translation. Here every trajectory, reference and generated alike, is
superposed onto the Cα atoms of the *first reference frame* (the initial structure a generator is
started from), so all coverage and dynamics numbers live in one shared frame of reference.

Choices made where the papers are silent:

- Superposition is a plain Kabsch fit on Cα atoms with equal weights, vectorised over frames
  with numpy (no iterative alignment to the mean structure).
- Only residues that are protein and carry a Cα atom count; caps (ACE, NME), waters and ions
  are ignored, so a solvated reference and a dry generated trajectory still match.
"""

from __future__ import annotations

import numpy as np
import mdtraj as md

__all__ = [
    "ca_indices",
    "ca_xyz",
    "ca_chain_ids",
    "kabsch_superpose",
    "superposed_rmsd",
    "aligned_ca",
]


def ca_indices(topology: md.Topology) -> np.ndarray:
    """Indices of the Cα atoms of protein residues, in topology order.

    Parameters
    ----------
    topology : mdtraj.Topology

    Returns
    -------
    np.ndarray, shape=(n_residues,), int
    """
    return np.array(
        [a.index for a in topology.atoms if a.name == "CA" and a.residue.is_protein],
        dtype=int,
    )


def ca_chain_ids(topology: md.Topology) -> np.ndarray:
    """Chain index of each Cα atom returned by :func:`ca_indices`.

    Returns
    -------
    np.ndarray, shape=(n_residues,), int
    """
    idx = ca_indices(topology)
    return np.array([topology.atom(i).residue.chain.index for i in idx], dtype=int)


def ca_xyz(traj: md.Trajectory | np.ndarray) -> np.ndarray:
    """Cα coordinates of a trajectory, or the array itself if one is given.

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm

    Returns
    -------
    np.ndarray, shape=(n_frames, n_residues, 3), float64, nm
    """
    if isinstance(traj, md.Trajectory):
        return np.asarray(traj.xyz[:, ca_indices(traj.topology)], dtype=np.float64)
    xyz = np.asarray(traj, dtype=np.float64)
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(
            f"Cα coordinates have shape {xyz.shape}, not (n_frames, n_residues, 3); "
            "pass an mdtraj.Trajectory or a 3-D array of positions in nm."
        )
    return xyz


def _kabsch_rotations(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotations R (F,3,3) minimising |mobile_c @ R^T - target_c| for centred inputs."""
    h = np.einsum("fni,fnj->fij", mobile, target)
    u, _, vt = np.linalg.svd(h)
    # The sign fix keeps a proper rotation when the best orthogonal fit is a reflection.
    d = np.sign(np.linalg.det(np.einsum("fij,fjk->fik", u, vt)))
    d = np.where(d == 0, 1.0, d)
    vt = vt.copy()
    vt[:, 2, :] *= d[:, None]
    return np.einsum("fji,fkj->fik", vt, u)


def kabsch_superpose(xyz: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rigidly superpose every frame onto a target structure (equal-weight Kabsch fit).

    Parameters
    ----------
    xyz : np.ndarray, shape=(n_frames, n_atoms, 3), nm
    target : np.ndarray, shape=(n_atoms, 3), nm

    Returns
    -------
    np.ndarray, shape=(n_frames, n_atoms, 3), nm
        Each frame rotated and translated to minimise its RMSD to ``target``.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    t_mean = target.mean(axis=0)
    mobile = xyz - xyz.mean(axis=1, keepdims=True)
    rot = _kabsch_rotations(mobile, np.broadcast_to(target - t_mean, mobile.shape))
    return np.einsum("fnj,fij->fni", mobile, rot) + t_mean


def superposed_rmsd(a: np.ndarray, b: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """RMSD between paired frames after optimal superposition of each pair.

    Parameters
    ----------
    a, b : np.ndarray, shape=(n_pairs, n_atoms, 3), nm
    chunk : int
        Pairs processed at once, to bound memory.

    Returns
    -------
    np.ndarray, shape=(n_pairs,), nm
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty(len(a))
    for s in range(0, len(a), chunk):
        ac = a[s : s + chunk] - a[s : s + chunk].mean(axis=1, keepdims=True)
        bc = b[s : s + chunk] - b[s : s + chunk].mean(axis=1, keepdims=True)
        rot = _kabsch_rotations(ac, bc)
        diff = np.einsum("fnj,fij->fni", ac, rot) - bc
        out[s : s + chunk] = np.sqrt((diff**2).sum(axis=(1, 2)) / a.shape[1])
    return out


def aligned_ca(traj: md.Trajectory | np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cα coordinates of ``traj`` superposed onto ``target`` (the first reference frame).

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    target : np.ndarray, shape=(n_residues, 3), nm

    Returns
    -------
    np.ndarray, shape=(n_frames, n_residues, 3), nm
    """
    xyz = ca_xyz(traj)
    if xyz.shape[1] != target.shape[0]:
        raise ValueError(
            f"trajectory has {xyz.shape[1]} Cα atoms but the alignment target has "
            f"{target.shape[0]}; compare trajectories of the same protein."
        )
    return kabsch_superpose(xyz, target)
