"""Structural validity of generated frames: Cα checks, energies, and validity along time.

STAR-MD reports the fraction of generated frames that are physically valid, and how that
fraction holds up along a long rollout (the paper's microsecond extrapolation shows baselines
collapsing late in the trajectory). This module holds the Cα-level checks, the optional energy
check, the combination of checks, and the block-wise fraction along time. The all-atom checks
(peptide bonds, heavy-atom clashes, Ramachandran and rotamer outliers) live in
:mod:`openmm_starmd.analysis.stereochemistry`.

Definitions (thresholds are parameters; the defaults are the paper's):

- **Cα clash**: some pair of Cα atoms closer than 0.30 nm (3.0 Å). Pairs of sequence neighbours
  in the same chain are exempt, because a *cis* peptide (common before proline) puts
  neighbouring Cα atoms at ~0.29 nm in perfectly good structures; neighbours are covered by
  the break check instead.
- **Cα break**: two consecutive Cα atoms of the same chain farther apart than 0.419 nm
  (4.19 Å). Consecutive pairs that are already farther apart in the initial structure
  (missing residues in the deposited model) can be exempted with ``ignore_pairs``.
- **Energy validity** (only if energies are available): a frame's potential energy is at most
  the 99th percentile of the reference MD's per-frame energies.
- **Validity along time**: the trajectory is cut into ``n_blocks`` equal blocks of frames and
  the fraction of valid frames is reported per block, with each block's start time in ns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import mdtraj as md
import openmm.unit as unit

from .alignment import ca_chain_ids, ca_xyz

__all__ = [
    "CaValidity",
    "consecutive_ca_pairs",
    "broken_pairs",
    "ca_clashes",
    "ca_breaks",
    "ca_validity",
    "energy_validity",
    "to_kj_per_mol",
    "validity_over_time",
]

CA_CLASH_NM = 0.30
CA_BREAK_NM = 0.419


class CaValidity(NamedTuple):
    """Per-frame Cα validity flags, each ``np.ndarray, shape=(n_frames,), bool``."""

    clash: np.ndarray
    broken: np.ndarray
    valid: np.ndarray


def consecutive_ca_pairs(topology: md.Topology) -> np.ndarray:
    """Positions (into the Cα list) of consecutive Cα pairs within the same chain.

    Returns
    -------
    np.ndarray, shape=(n_pairs, 2), int
        Indices into the array returned by :func:`~openmm_starmd.analysis.alignment.ca_indices`.
    """
    chains = ca_chain_ids(topology)
    i = np.flatnonzero(chains[:-1] == chains[1:])
    return np.stack([i, i + 1], axis=1) if len(i) else np.zeros((0, 2), dtype=int)


def broken_pairs(traj: md.Trajectory, frame: int = 0,
                 max_distance_nm: float = CA_BREAK_NM) -> np.ndarray:
    """Consecutive same-chain Cα pairs already farther apart than the break threshold.

    Used on the initial structure to exempt genuine gaps (missing residues) from the break check.

    Returns
    -------
    np.ndarray, shape=(n_gaps, 2), int
        Indices into the Cα list.
    """
    pairs = consecutive_ca_pairs(traj.topology)
    xyz = ca_xyz(traj[frame])[0]
    d = np.linalg.norm(xyz[pairs[:, 0]] - xyz[pairs[:, 1]], axis=-1)
    return pairs[d > max_distance_nm]


def ca_clashes(traj: md.Trajectory, min_distance_nm: float = CA_CLASH_NM) -> np.ndarray:
    """Flag frames where two Cα atoms (not same-chain neighbours) are closer than a threshold.

    Parameters
    ----------
    traj : mdtraj.Trajectory
        All-atom or Cα-only; Cα atoms are selected by name.
    min_distance_nm : float, nm
        Default 0.30 nm (3.0 Å).

    Returns
    -------
    np.ndarray, shape=(n_frames,), bool
        True where the frame has at least one clash.
    """
    xyz = ca_xyz(traj)
    chains = ca_chain_ids(traj.topology)
    n = xyz.shape[1]
    i, j = np.triu_indices(n, k=1)
    neighbours = (j == i + 1) & (chains[i] == chains[j])
    i, j = i[~neighbours], j[~neighbours]
    out = np.zeros(len(xyz), dtype=bool)
    # Chunk over frames so memory stays bounded for long trajectories of big proteins.
    step = max(1, 2_000_000 // max(len(i), 1))
    for s in range(0, len(xyz), step):
        d = np.linalg.norm(xyz[s : s + step, i] - xyz[s : s + step, j], axis=-1)
        out[s : s + step] = (d < min_distance_nm).any(axis=1)
    return out


def ca_breaks(traj: md.Trajectory, max_distance_nm: float = CA_BREAK_NM,
              ignore_pairs: np.ndarray | None = None) -> np.ndarray:
    """Flag frames where consecutive Cα atoms of a chain are farther apart than a threshold.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    max_distance_nm : float, nm
        Default 0.419 nm (4.19 Å).
    ignore_pairs : np.ndarray, shape=(n, 2), int, optional
        Cα-list index pairs exempt from the check (gaps in the deposited structure,
        see :func:`broken_pairs`).

    Returns
    -------
    np.ndarray, shape=(n_frames,), bool
        True where the chain is broken somewhere in the frame.
    """
    pairs = consecutive_ca_pairs(traj.topology)
    if ignore_pairs is not None and len(ignore_pairs):
        skip = {tuple(p) for p in np.asarray(ignore_pairs).tolist()}
        pairs = np.array([p for p in pairs.tolist() if tuple(p) not in skip], dtype=int)
    if len(pairs) == 0:
        return np.zeros(traj.n_frames, dtype=bool)
    xyz = ca_xyz(traj)
    d = np.linalg.norm(xyz[:, pairs[:, 0]] - xyz[:, pairs[:, 1]], axis=-1)
    return (d > max_distance_nm).any(axis=1)


def ca_validity(traj: md.Trajectory, clash_nm: float = CA_CLASH_NM,
                break_nm: float = CA_BREAK_NM,
                ignore_pairs: np.ndarray | None = None) -> CaValidity:
    """Cα validity of every frame: no clash and no chain break.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    clash_nm : float, nm
        Minimum allowed distance between non-neighbouring Cα atoms (default 0.30 nm).
    break_nm : float, nm
        Maximum allowed distance between consecutive Cα atoms of a chain (default 0.419 nm).
    ignore_pairs : np.ndarray, shape=(n, 2), int, optional
        Consecutive pairs exempt from the break check.

    Returns
    -------
    CaValidity
        ``clash``, ``broken`` and ``valid`` flags, each of shape (n_frames,).
    """
    clash = ca_clashes(traj, clash_nm)
    broken = ca_breaks(traj, break_nm, ignore_pairs)
    return CaValidity(clash=clash, broken=broken, valid=~(clash | broken))


def to_kj_per_mol(energies) -> np.ndarray:
    """Per-frame energies as a float array in kJ/mol (Quantities converted, numbers kept)."""
    if unit.is_quantity(energies):
        return np.asarray(energies.value_in_unit(unit.kilojoule_per_mole), dtype=np.float64)
    if isinstance(energies, (list, tuple)) and energies and unit.is_quantity(energies[0]):
        return np.array([e.value_in_unit(unit.kilojoule_per_mole) for e in energies])
    return np.asarray(energies, dtype=np.float64)


def energy_validity(energies, reference_energies, percentile: float = 99.0) -> np.ndarray:
    """Flag frames whose potential energy is within the reference MD's range.

    Parameters
    ----------
    energies : openmm.unit.Quantity or array_like, shape=(n_frames,)
        Per-frame potential energies of the generated trajectory; bare numbers are kJ/mol.
    reference_energies : openmm.unit.Quantity or array_like, shape=(n_reference_frames,)
        Per-frame potential energies of the reference MD, same force field; bare numbers kJ/mol.
    percentile : float
        Frames up to this percentile of the reference energies count as valid (default 99).

    Returns
    -------
    np.ndarray, shape=(n_frames,), bool
        True where the energy is finite and at most the reference percentile.
    """
    e = to_kj_per_mol(energies)
    ref = to_kj_per_mol(reference_energies)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise ValueError("reference_energies has no finite values; pass the per-frame "
                         "potential energies of the reference MD.")
    limit = np.percentile(ref, percentile)
    return np.isfinite(e) & (e <= limit)


def validity_over_time(valid: np.ndarray, dt_ns: float,
                       n_blocks: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of valid frames in consecutive blocks of a trajectory.

    Parameters
    ----------
    valid : np.ndarray, shape=(n_frames,), bool
    dt_ns : float, ns
        Frame spacing.
    n_blocks : int
        Number of blocks (fewer if the trajectory has fewer frames).

    Returns
    -------
    block_start_ns : np.ndarray, shape=(n_blocks,), ns
        Time of the first frame of each block (frame 0 at t = 0).
    fraction : np.ndarray, shape=(n_blocks,)
        Fraction of valid frames in each block.
    """
    valid = np.asarray(valid, dtype=bool)
    if len(valid) == 0:
        return np.zeros(0), np.zeros(0)
    n_blocks = max(1, min(n_blocks, len(valid)))
    edges = np.linspace(0, len(valid), n_blocks + 1).round().astype(int)
    starts = edges[:-1]
    frac = np.array([valid[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    return starts * dt_ns, frac
