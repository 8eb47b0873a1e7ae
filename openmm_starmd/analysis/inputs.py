"""Loading and checking the trajectories an evaluation compares.

Every check here turns a confusing downstream failure (a shape error deep inside PCA, a NaN
JSD) into one sentence that names the file, what is wrong and how to fix it, raised *before*
any output is written.

Choices made where the papers are silent:

- Two trajectories describe the same protein when their protein residues that carry a Cα have
  the same one-letter sequence, chain by chain concatenated. Protonation and force-field
  variants (HID/HIE/HIP, CYX, ASH, GLH, LYN, ...) count as their parent residue, so an OpenMM
  run and a structure from the PDB compare cleanly.
- The frame spacing of a trajectory is never guessed from a file header unless the header gives
  a positive time step; otherwise the caller must say it (``dt_ns``).
"""

from __future__ import annotations

import os

import numpy as np
import mdtraj as md

from .alignment import ca_indices

__all__ = [
    "InputError",
    "canonical_residue_name",
    "protein_sequence",
    "load_trajectory",
    "check_finite",
    "check_same_protein",
    "lag_frames",
    "infer_dt_ns",
]

# Force-field and protonation variants mapped to their standard residue.
_VARIANTS = {
    "HID": "HIS", "HIE": "HIS", "HIP": "HIS", "HSD": "HIS", "HSE": "HIS", "HSP": "HIS",
    "CYX": "CYS", "CYM": "CYS", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS", "MSE": "MET",
}


class InputError(ValueError):
    """An evaluation input is unusable; the message says which one and how to fix it."""


def canonical_residue_name(name: str) -> str:
    """Standard three-letter name of a residue, folding protonation/force-field variants."""
    name = name.upper()
    return _VARIANTS.get(name, name)


def protein_sequence(topology: md.Topology) -> list[str]:
    """Canonical three-letter names of the residues that carry a Cα, in topology order."""
    return [
        canonical_residue_name(topology.atom(i).residue.name) for i in ca_indices(topology)
    ]


def load_trajectory(path: str, top: str | None = None, label: str = "trajectory") -> md.Trajectory:
    """Load any mdtraj-readable trajectory, turning loader failures into clear errors.

    Parameters
    ----------
    path : str
        Trajectory file (DCD, XTC, PDB, ...).
    top : str, optional
        Topology file (PDB, ...) for formats that carry no topology.
    label : str
        What the file is ("reference", "generated"), used in error messages.

    Returns
    -------
    mdtraj.Trajectory
    """
    if not os.path.exists(path):
        raise InputError(f"{label} file '{path}' does not exist; check the path.")
    if top is not None and not os.path.exists(top):
        raise InputError(f"{label} topology '{top}' does not exist; check the path.")
    try:
        traj = md.load(path, top=top) if top is not None else md.load(path)
    except (ValueError, OSError, IndexError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if top is not None:
            n_top = md.load_topology(top).n_atoms
            n_file = _atoms_in_file(path)
            if n_file is not None and n_file != n_top:
                raise InputError(
                    f"{label} '{path}' has {n_file} atoms but topology '{top}' has {n_top}; "
                    "pass the topology the trajectory was written with."
                ) from exc
        raise InputError(f"{label} '{path}' could not be read ({first_line}); check it is a "
                         "complete trajectory, with the matching topology file.") from exc
    if traj.n_frames == 0:
        raise InputError(f"{label} '{path}' has no frames; pass a trajectory with frames.")
    return traj


def _atoms_in_file(path: str) -> int | None:
    """Atoms per frame stored in a trajectory file, read from its first frame if possible."""
    try:
        with md.open(path) as fh:
            out = fh.read(n_frames=1)
        xyz = out[0] if isinstance(out, tuple) else out
        return int(np.asarray(xyz).shape[1])
    except Exception:  # any format mdtraj cannot open by itself: no count to report
        return None


def check_finite(traj: md.Trajectory, label: str) -> None:
    """Raise if any coordinate is NaN or infinite, naming the first bad frame."""
    bad = ~np.isfinite(traj.xyz).all(axis=(1, 2))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{label} has non-finite (NaN/inf) coordinates in {int(bad.sum())} of "
            f"{traj.n_frames} frames (first: frame {first}); remove those frames or "
            "regenerate the trajectory."
        )


def check_same_protein(reference: md.Trajectory, generated: md.Trajectory,
                       ref_label: str = "reference", gen_label: str = "generated") -> None:
    """Raise unless both trajectories hold the same protein sequence (Cα-bearing residues)."""
    ref_seq = protein_sequence(reference.topology)
    gen_seq = protein_sequence(generated.topology)
    if not ref_seq:
        raise InputError(f"{ref_label} has no protein Cα atoms; pass a protein trajectory "
                         "with a topology that names its atoms.")
    if len(ref_seq) != len(gen_seq):
        raise InputError(
            f"{ref_label} has {len(ref_seq)} protein residues but {gen_label} has "
            f"{len(gen_seq)}; evaluate a trajectory of the same protein (and check the "
            "generated topology, e.g. --gen-top)."
        )
    for i, (a, b) in enumerate(zip(ref_seq, gen_seq)):
        if a != b:
            raise InputError(
                f"{ref_label} and {gen_label} have different sequences (first difference "
                f"at protein residue {i}: {a} vs {b}); evaluate a trajectory of the same protein."
            )


def lag_frames(lag_ns: float, dt_ns: float, n_frames: int, label: str, what: str = "lag") -> int:
    """Convert a lag in ns to a whole number of frames, checking the trajectory is long enough.

    Parameters
    ----------
    lag_ns : float, ns
    dt_ns : float, ns
        Frame spacing of the trajectory.
    n_frames : int
    label, what : str
        Names used in error messages.

    Returns
    -------
    int
        ``round(lag_ns / dt_ns)``, at least 1.
    """
    if lag_ns <= 0 or dt_ns <= 0:
        raise InputError(f"{what} ({lag_ns} ns) and frame spacing ({dt_ns} ns) of {label} "
                         "must be positive; pass positive times in ns.")
    k = int(round(lag_ns / dt_ns))
    if k < 1:
        raise InputError(
            f"{what} of {lag_ns} ns is shorter than the {dt_ns} ns frame spacing of {label}; "
            "pass a lag of at least one frame."
        )
    # Time-lagged covariances need more pairs than features to be meaningful at all.
    if n_frames < k + 3:
        raise InputError(
            f"{label} has {n_frames} frames at {dt_ns} ns spacing, too few for the "
            f"{what} of {lag_ns} ns ({k} frames; needs at least {k + 3}); pass a shorter "
            "lag (--tica-lag-ns) or a longer trajectory."
        )
    return k


# Formats whose frames carry real simulation times; DCD and PDB do not (mdtraj numbers their
# frames 0, 1, 2, ... ps), so their spacing is never inferred.
_TIMED_FORMATS = (".xtc", ".trr", ".h5", ".nc", ".netcdf", ".lh5")


def infer_dt_ns(traj: md.Trajectory, path: str | None = None) -> float | None:
    """Frame spacing in ns from the trajectory's own times, or None where they carry none.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    path : str, optional
        File the trajectory came from; only formats that store times (XTC, TRR, HDF5,
        NetCDF) are trusted.

    Returns
    -------
    float or None, ns
    """
    if traj.n_frames < 2 or path is None or not path.lower().endswith(_TIMED_FORMATS):
        return None
    step_ps = float(traj.timestep)
    if not np.isfinite(step_ps) or step_ps <= 0:
        return None
    return step_ps / 1000.0
