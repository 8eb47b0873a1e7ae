"""Cheap baselines that every generated trajectory should beat, and the MD oracle's place.

STAR-MD's tables put a model between a floor and a ceiling. The ceiling is the *MD oracle*:
a second, independent MD replica evaluated with exactly the same metrics as a generated
trajectory (there is no code for it here; call the metrics with replica 2 as "generated").
The floors are structure-only generators that know the initial structure and, at most, how much
the MD fluctuates:

- **ANM**: an anisotropic network model (Atilgan et al. 2001) on the Cα atoms of the initial
  structure: springs of equal stiffness between Cα atoms closer than 1.5 nm (ProDy's default
  cutoff). Frames are independent draws from the model's Gaussian (Boltzmann) distribution,
  x = x0 + Σ_k sqrt(s / λ_k) ξ_k v_k over the non-rigid modes (λ_k > 0, ξ_k ~ N(0, 1)), with a
  *single* global scale s chosen so the total mean-square fluctuation Σ_i <|Δx_i|²> equals
  that of the reference MD (Σ_i RMSF_i²). Its RMSF *profile* is therefore the ANM's own
  prediction; only the overall amplitude is borrowed from MD.
- **Gaussian noise**: the initial structure with independent isotropic Gaussian noise on each
  Cα, of per-axis standard deviation RMSF_i / sqrt(3), so each residue's expected RMSF matches
  the MD's. This baseline knows the MD RMSF profile, so its RMSF correlation is near 1 by
  construction; it shows how much of the other metrics a correct per-residue amplitude alone buys.

Both return Cα-only mdtraj Trajectories whose frames are independent (no dynamics), stamped
with a frame spacing so the dynamics metrics can run on them.
"""

from __future__ import annotations

import numpy as np
import mdtraj as md

from .alignment import ca_indices, ca_xyz

__all__ = ["anm_hessian", "anm_modes", "anm_ensemble", "gaussian_ensemble"]

ANM_CUTOFF_NM = 1.5


def anm_hessian(xyz: np.ndarray, cutoff_nm: float = ANM_CUTOFF_NM,
                gamma: float = 1.0) -> np.ndarray:
    """Hessian of the anisotropic network model of a Cα structure.

    Parameters
    ----------
    xyz : np.ndarray, shape=(n_residues, 3), nm
    cutoff_nm : float, nm
        Pairs closer than this are joined by a spring (default 1.5 nm).
    gamma : float
        Spring constant (arbitrary units; only ratios matter once amplitudes are matched).

    Returns
    -------
    np.ndarray, shape=(3 * n_residues, 3 * n_residues)
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    i, j = np.triu_indices(n, k=1)
    d = xyz[j] - xyz[i]
    r2 = (d**2).sum(-1)
    keep = r2 < cutoff_nm**2
    i, j, d, r2 = i[keep], j[keep], d[keep], r2[keep]
    blocks = -gamma * d[:, :, None] * d[:, None, :] / r2[:, None, None]
    h = np.zeros((n, n, 3, 3))
    h[i, j] = blocks
    h[j, i] = blocks
    # Diagonal blocks balance the row so rigid translations cost nothing.
    diag = -h.sum(axis=1)
    h[np.arange(n), np.arange(n)] = diag
    return h.transpose(0, 2, 1, 3).reshape(3 * n, 3 * n)


def anm_modes(xyz: np.ndarray, cutoff_nm: float = ANM_CUTOFF_NM,
              rel_tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Non-rigid normal modes of the ANM of a Cα structure.

    Parameters
    ----------
    xyz : np.ndarray, shape=(n_residues, 3), nm
    cutoff_nm : float, nm
    rel_tol : float
        Eigenvalues below ``rel_tol * max eigenvalue`` are rigid-body (zero) modes.

    Returns
    -------
    eigenvalues : np.ndarray, shape=(n_modes,)
        Increasing, all positive (6 fewer than 3 * n_residues for a connected network).
    modes : np.ndarray, shape=(n_modes, n_residues, 3)
        Orthonormal displacement vectors.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    lam, vec = np.linalg.eigh(anm_hessian(xyz, cutoff_nm))
    keep = lam > rel_tol * lam.max()
    return lam[keep], vec[:, keep].T.reshape(-1, len(xyz), 3)


def _ca_trajectory(initial: md.Trajectory, xyz: np.ndarray, dt_ns: float) -> md.Trajectory:
    top = initial.topology.subset(ca_indices(initial.topology))
    time_ps = np.arange(len(xyz)) * dt_ns * 1000.0
    return md.Trajectory(xyz.astype(np.float32), top, time=time_ps)


def _target_msf(reference_rmsf_nm: np.ndarray, n: int) -> np.ndarray:
    r = np.asarray(reference_rmsf_nm, dtype=np.float64)
    if r.shape != (n,):
        raise ValueError(f"reference_rmsf_nm has shape {r.shape} but the initial structure has "
                         f"{n} Cα atoms; pass the per-residue RMSF of the same protein.")
    return r**2


def anm_ensemble(initial: md.Trajectory, reference_rmsf_nm: np.ndarray, n_frames: int,
                 dt_ns: float = 1.0, cutoff_nm: float = ANM_CUTOFF_NM,
                 seed: int = 0) -> md.Trajectory:
    """Independent ANM samples around the initial structure, amplitude matched to MD.

    Parameters
    ----------
    initial : mdtraj.Trajectory
        Its first frame is the initial structure.
    reference_rmsf_nm : np.ndarray, shape=(n_residues,), nm
        Per-residue Cα RMSF of the reference MD; only its sum of squares is used.
    n_frames : int
    dt_ns : float, ns
        Frame spacing stamped on the output.
    cutoff_nm : float, nm
    seed : int

    Returns
    -------
    mdtraj.Trajectory
        Cα-only, ``n_frames`` frames.
    """
    x0 = ca_xyz(initial[:1])[0]
    msf = _target_msf(reference_rmsf_nm, len(x0))
    lam, modes = anm_modes(x0, cutoff_nm)
    scale = msf.sum() / (1.0 / lam).sum()
    rng = np.random.default_rng(seed)
    amp = rng.standard_normal((n_frames, len(lam))) * np.sqrt(scale / lam)
    xyz = x0 + np.einsum("fk,kni->fni", amp, modes)
    return _ca_trajectory(initial, xyz, dt_ns)


def gaussian_ensemble(initial: md.Trajectory, reference_rmsf_nm: np.ndarray, n_frames: int,
                      dt_ns: float = 1.0, seed: int = 0) -> md.Trajectory:
    """Initial Cα structure plus independent Gaussian noise matched to the MD RMSF per residue.

    Parameters
    ----------
    initial : mdtraj.Trajectory
        Its first frame is the initial structure.
    reference_rmsf_nm : np.ndarray, shape=(n_residues,), nm
    n_frames : int
    dt_ns : float, ns
    seed : int

    Returns
    -------
    mdtraj.Trajectory
        Cα-only, ``n_frames`` frames.
    """
    x0 = ca_xyz(initial[:1])[0]
    sigma = np.sqrt(_target_msf(reference_rmsf_nm, len(x0)) / 3.0)
    rng = np.random.default_rng(seed)
    xyz = x0 + rng.standard_normal((n_frames, len(x0), 3)) * sigma[None, :, None]
    return _ca_trajectory(initial, xyz, dt_ns)
