"""All-atom validity: peptide bonds, heavy-atom clashes, Ramachandran and rotamer outliers.

STAR-MD judges generated frames that have been mapped back to all atoms with MolProbity-style
checks, with the Ramachandran and rotamer thresholds set at the 99th percentile of the MD
oracle. This module implements those checks on mdtraj Trajectories, with every reference
distribution *estimated from the reference MD trajectory itself* (no external rotamer library
or MolProbity contours are shipped or downloaded).

Definitions and the choices made where the paper is silent:

- **Peptide bond**: the distance between atom C of residue i and atom N of residue i+1 in the
  same chain. A frame fails when any such bond is longer than ``peptide_bond_nm`` = 0.140 nm
  (1.40 Å; the ideal trans peptide bond is 0.133 nm). Thermal MD stretches this bond with a
  standard deviation of ~0.002 nm, so good MD frames exceed 0.140 nm somewhere fairly often
  (15–25% of frames of a 48-residue protein in amber99sbildn runs); the threshold is a
  parameter. Pairs whose C–N distance is already above 0.2 nm in the initial reference
  structure (missing residues) are exempt.
- **Heavy-atom clash**: two protein heavy atoms more than four bonds apart whose van der Waals
  spheres overlap by at least 0.04 nm (0.4 Å, MolProbity's "serious clash"), with Bondi (1964)
  radii C 0.170, N 0.155, O 0.152, S 0.180 nm. Pairs four bonds apart are exempt as well as
  closer ones because covalent geometry alone puts some of them inside that overlap
  (O(i)–C(i+1) sits at 0.28–0.30 nm in helices, flagged in most frames of good MD otherwise).
  Hydrogens are not modelled (generated frames may not carry them), so N/O–N/O pairs, which
  may be hydrogen bonded, clash only when closer than 0.25 nm, and S–S pairs (possible
  disulfides) never clash. The per-frame *clashscore* is the number of clashes per 1000 heavy
  atoms, as in MolProbity.
- **Ramachandran outlier**: a residue whose (φ, ψ) falls where the reference MD is rarest. The
  reference density is a 36×36 (10°) periodic histogram of (φ, ψ), smoothed with a 10°
  Gaussian, pooled per residue class (MolProbity's glycine, proline, pre-proline and general
  classes); a residue is an outlier when its density is below the 1st percentile of the
  reference's own residue densities of that class (so 1% of reference residue-frames are
  outliers).
- **Rotamer outlier**: the same construction per residue type on (χ1, χ2) (χ1 alone for
  residues without χ2); χ2 of Asp, Phe and Tyr is symmetrised by 180° (their two terminal atoms
  are chemically equivalent).
- A class with fewer than ``min_samples`` reference samples is not judged (no outliers), since
  its density cannot be estimated.
- **Frame thresholds** ("99th percentile of the MD oracle"): a frame passes the clash,
  Ramachandran and rotamer checks when its clashscore and its fractions of Ramachandran and
  rotamer outliers are at most the 99th percentile of the same per-frame quantities over the
  reference MD. All-atom valid = all four checks pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import mdtraj as md
from scipy import sparse
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from .alignment import ca_indices
from .inputs import canonical_residue_name

__all__ = [
    "BONDI_RADII_NM",
    "is_all_atom",
    "peptide_bond_atoms",
    "peptide_bond_lengths",
    "heavy_atom_clashscore",
    "backbone_dihedrals",
    "sidechain_dihedrals",
    "ramachandran_classes",
    "DihedralReference",
    "fit_dihedral_reference",
    "AllAtomCriteria",
    "AllAtomValidity",
    "fit_allatom_criteria",
    "allatom_validity",
]

# Bondi, A. (1964) "van der Waals Volumes and Radii", J. Phys. Chem. 68, 441.
BONDI_RADII_NM = {"C": 0.170, "N": 0.155, "O": 0.152, "S": 0.180, "Se": 0.190, "P": 0.180}
PEPTIDE_BOND_NM = 0.140
PEPTIDE_GAP_NM = 0.20
CLASH_OVERLAP_NM = 0.04
HBOND_MIN_NM = 0.25
_SYMMETRIC_CHI2 = {"ASP", "PHE", "TYR"}


def _protein_residues(topology: md.Topology) -> list:
    """The Cα-bearing protein residues, in the order of :func:`ca_indices`."""
    return [topology.atom(i).residue for i in ca_indices(topology)]


def is_all_atom(topology: md.Topology) -> bool:
    """True if every protein residue has N, CA, C and (unless glycine) CB atoms."""
    residues = _protein_residues(topology)
    if not residues:
        return False
    for res in residues:
        names = {a.name for a in res.atoms}
        if not {"N", "CA", "C"} <= names:
            return False
        if canonical_residue_name(res.name) != "GLY" and "CB" not in names:
            return False
    return True


def peptide_bond_atoms(topology: md.Topology) -> tuple[np.ndarray, np.ndarray]:
    """Atom pairs (C of residue i, N of residue i+1) of every peptide bond within a chain.

    Returns
    -------
    pairs : np.ndarray, shape=(n_bonds, 2), int
        Atom indices.
    residue : np.ndarray, shape=(n_bonds,), int
        Position of residue i in the Cα list, which names the bond independently of atom order.
    """
    residues = _protein_residues(topology)
    pairs, pos = [], []
    for k, (a, b) in enumerate(zip(residues[:-1], residues[1:])):
        if a.chain.index != b.chain.index:
            continue
        c = [x.index for x in a.atoms if x.name == "C"]
        n = [x.index for x in b.atoms if x.name == "N"]
        if c and n:
            pairs.append((c[0], n[0]))
            pos.append(k)
    return np.array(pairs, dtype=int).reshape(-1, 2), np.array(pos, dtype=int)


def peptide_bond_lengths(traj: md.Trajectory) -> np.ndarray:
    """Length of every peptide bond C(i)–N(i+1) in every frame.

    Returns
    -------
    np.ndarray, shape=(n_frames, n_bonds), nm
    """
    pairs, _ = peptide_bond_atoms(traj.topology)
    if len(pairs) == 0:
        return np.zeros((traj.n_frames, 0))
    return np.linalg.norm(traj.xyz[:, pairs[:, 0]] - traj.xyz[:, pairs[:, 1]], axis=-1)


def _heavy_atoms(topology: md.Topology):
    """Heavy protein atoms, their radii, polarity, sulfur flags, and bonded-within-4 pair codes."""
    heavy = np.array([a.index for a in topology.atoms
                      if a.residue.is_protein and a.element is not None
                      and a.element.symbol != "H"], dtype=int)
    symbols = [topology.atom(i).element.symbol for i in heavy]
    radii = np.array([BONDI_RADII_NM.get(s, 0.170) for s in symbols])
    polar = np.array([s in ("N", "O") for s in symbols])
    sulfur = np.array([s == "S" for s in symbols])
    if topology.n_bonds == 0:
        topology = topology.copy()
        topology.create_standard_bonds()
    local = -np.ones(topology.n_atoms, dtype=int)
    local[heavy] = np.arange(len(heavy))
    bonds = np.array([(local[a.index], local[b.index]) for a, b in topology.bonds
                      if local[a.index] >= 0 and local[b.index] >= 0], dtype=int).reshape(-1, 2)
    n = len(heavy)
    adj = sparse.coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.int32).tocsr()
    # Atoms joined by at most four bonds are placed by covalent geometry, not by vdW contact.
    a2 = adj @ adj
    near = adj + a2 + a2 @ adj + a2 @ a2
    near = sparse.triu(near, k=1).tocoo()
    codes = np.unique(near.row.astype(np.int64) * n + near.col)
    return heavy, radii, polar, sulfur, codes


def heavy_atom_clashscore(traj: md.Trajectory, overlap_nm: float = CLASH_OVERLAP_NM,
                          hbond_min_nm: float = HBOND_MIN_NM) -> np.ndarray:
    """MolProbity-style clashscore on heavy atoms: serious clashes per 1000 heavy atoms.

    Parameters
    ----------
    traj : mdtraj.Trajectory
        All-atom protein trajectory (hydrogens, if present, are ignored). Pairs within four
        bonds of each other are never clashes.
    overlap_nm : float, nm
        vdW overlap (r_i + r_j - d) that makes a clash; default 0.04 nm (0.4 Å).
    hbond_min_nm : float, nm
        N/O–N/O pairs clash only below this distance (possible hydrogen bonds).

    Returns
    -------
    np.ndarray, shape=(n_frames,)
        Clashes per 1000 heavy atoms.
    """
    heavy, radii, polar, sulfur, codes = _heavy_atoms(traj.topology)
    n = len(heavy)
    cutoff = 2 * radii.max() - overlap_nm
    out = np.zeros(traj.n_frames)
    for f in range(traj.n_frames):
        pairs = cKDTree(traj.xyz[f, heavy]).query_pairs(cutoff, output_type="ndarray")
        if len(pairs) == 0:
            continue
        i, j = pairs[:, 0], pairs[:, 1]
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = ~np.isin(lo.astype(np.int64) * n + hi, codes, assume_unique=False)
        keep &= ~(sulfur[lo] & sulfur[hi])
        lo, hi = lo[keep], hi[keep]
        d = np.linalg.norm(traj.xyz[f, heavy[lo]] - traj.xyz[f, heavy[hi]], axis=-1)
        both_polar = polar[lo] & polar[hi]
        clash = np.where(both_polar, d < hbond_min_nm, radii[lo] + radii[hi] - d >= overlap_nm)
        out[f] = clash.sum() * 1000.0 / n
    return out


def _per_residue(traj: md.Trajectory, indices: np.ndarray, angles: np.ndarray,
                 which_atom: int) -> np.ndarray:
    """Scatter dihedral columns into a (n_frames, n_residues) array indexed by Cα position."""
    position = {res.index: k for k, res in enumerate(_protein_residues(traj.topology))}
    out = np.full((traj.n_frames, len(position)), np.nan)
    for col, quad in enumerate(indices):
        k = position.get(traj.topology.atom(int(quad[which_atom])).residue.index)
        if k is not None:
            out[:, k] = angles[:, col]
    return out


def backbone_dihedrals(traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """φ and ψ of every Cα-bearing residue, NaN where undefined (chain termini).

    Returns
    -------
    phi, psi : np.ndarray, shape=(n_frames, n_residues), radians in [-π, π)
    """
    ip, phi = md.compute_phi(traj, periodic=False)
    iq, psi = md.compute_psi(traj, periodic=False)
    # φ = C(i-1)-N(i)-CA(i)-C(i) belongs to the residue of its N; ψ = N(i)-CA-C-N(i+1) to its N.
    return _per_residue(traj, ip, phi, 1), _per_residue(traj, iq, psi, 0)


def sidechain_dihedrals(traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """χ1 and χ2 of every Cα-bearing residue, NaN where the residue has none.

    Returns
    -------
    chi1, chi2 : np.ndarray, shape=(n_frames, n_residues), radians in [-π, π)
    """
    i1, chi1 = md.compute_chi1(traj, periodic=False)
    i2, chi2 = md.compute_chi2(traj, periodic=False)
    return _per_residue(traj, i1, chi1, 1), _per_residue(traj, i2, chi2, 1)


def ramachandran_classes(topology: md.Topology) -> list[str]:
    """MolProbity's Ramachandran class of each Cα-bearing residue.

    Returns
    -------
    list of str, length n_residues
        "GLY", "PRO", "PREPRO" (any other residue followed by proline in its chain) or "GENERAL".
    """
    residues = _protein_residues(topology)
    names = [canonical_residue_name(r.name) for r in residues]
    out = []
    for k, (res, name) in enumerate(zip(residues, names)):
        nxt_pro = (k + 1 < len(residues) and names[k + 1] == "PRO"
                   and residues[k + 1].chain.index == res.chain.index)
        if name in ("GLY", "PRO"):
            out.append(name)
        elif nxt_pro:
            out.append("PREPRO")
        else:
            out.append("GENERAL")
    return out


class _PeriodicDensity:
    """Smoothed periodic histogram of angles in 1 or 2 dimensions; log-probability per bin."""

    def __init__(self, samples: np.ndarray, bins: int, sigma_bins: float):
        d = samples.shape[1]
        hist, _ = np.histogramdd(samples, bins=[bins] * d, range=[(-np.pi, np.pi)] * d)
        hist = gaussian_filter(hist, sigma_bins, mode="wrap")
        self.bins = bins
        self.log_p = np.log(hist / hist.sum() + 1e-12)

    def logpdf(self, angles: np.ndarray) -> np.ndarray:
        idx = np.floor((angles + np.pi) / (2 * np.pi) * self.bins).astype(int) % self.bins
        return self.log_p[tuple(idx.T)]


@dataclass
class DihedralReference:
    """Reference (φ, ψ) and (χ1, χ2) densities estimated from a reference MD trajectory.

    Build with :func:`fit_dihedral_reference`. ``rama`` maps a Ramachandran class and
    ``rotamer`` a residue name to a fitted density and its log-density threshold.
    """

    rama: dict = field(default_factory=dict)
    rotamer: dict = field(default_factory=dict)
    percentile: float = 99.0

    def ramachandran_outliers(self, traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
        """Ramachandran outliers of every residue in every frame.

        Returns
        -------
        outlier : np.ndarray, shape=(n_frames, n_residues), bool
        judged : np.ndarray, shape=(n_residues,), bool
            Residues with both φ and ψ and a fitted class density.
        """
        phi, psi = backbone_dihedrals(traj)
        classes = np.array(ramachandran_classes(traj.topology))
        judged = np.isfinite(phi).all(0) & np.isfinite(psi).all(0)
        judged &= np.array([c in self.rama for c in classes], dtype=bool)
        out = np.zeros(phi.shape, dtype=bool)
        for cls, (density, threshold) in self.rama.items():
            cols = np.flatnonzero(judged & (classes == cls))
            if len(cols):
                ang = np.stack([phi[:, cols], psi[:, cols]], axis=-1).reshape(-1, 2)
                out[:, cols] = (density.logpdf(ang) < threshold).reshape(len(phi), len(cols))
        return out, judged

    def rotamer_outliers(self, traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
        """Side-chain rotamer outliers of every residue in every frame.

        Returns
        -------
        outlier : np.ndarray, shape=(n_frames, n_residues), bool
        judged : np.ndarray, shape=(n_residues,), bool
            Residues with χ1 and a fitted density for their residue type.
        """
        chi1, chi2 = sidechain_dihedrals(traj)
        names = np.array([canonical_residue_name(r.name)
                          for r in _protein_residues(traj.topology)])
        judged = np.isfinite(chi1).all(0) & np.array([n in self.rotamer for n in names], bool)
        out = np.zeros(chi1.shape, dtype=bool)
        for name, (density, threshold, dims) in self.rotamer.items():
            cols = np.flatnonzero(judged & (names == name))
            if not len(cols):
                continue
            if dims == 2 and np.isfinite(chi2[:, cols]).all():
                ang = np.stack([chi1[:, cols], chi2[:, cols]], axis=-1).reshape(-1, 2)
            elif dims == 1:
                ang = chi1[:, cols].reshape(-1, 1)
            else:
                judged[cols] = False
                continue
            out[:, cols] = (density.logpdf(ang) < threshold).reshape(len(chi1), len(cols))
        return out, judged


def fit_dihedral_reference(reference: md.Trajectory, percentile: float = 99.0,
                           bins: int = 36, sigma_deg: float = 10.0,
                           min_samples: int = 50) -> DihedralReference:
    """Estimate per-class (φ, ψ) and per-residue-type (χ1, χ2) densities from reference MD.

    Parameters
    ----------
    reference : mdtraj.Trajectory
        All-atom reference MD trajectory.
    percentile : float
        Residue-frames of the reference below the (100 - percentile)-th percentile of density
        are outliers (default 99: 1% of reference residue-frames).
    bins : int
        Histogram bins per angle over [-π, π) (default 36, i.e. 10°).
    sigma_deg : float, degrees
        Width of the periodic Gaussian smoothing.
    min_samples : int
        Classes with fewer (residue-frame) samples are not judged.

    Returns
    -------
    DihedralReference
    """
    sigma_bins = sigma_deg / (360.0 / bins)
    lower = 100.0 - percentile
    ref = DihedralReference(percentile=percentile)

    phi, psi = backbone_dihedrals(reference)
    classes = np.array(ramachandran_classes(reference.topology))
    for cls in ("GENERAL", "GLY", "PRO", "PREPRO"):
        cols = np.flatnonzero((classes == cls) & np.isfinite(phi).all(0) & np.isfinite(psi).all(0))
        ang = np.stack([phi[:, cols], psi[:, cols]], axis=-1).reshape(-1, 2)
        if len(ang) >= min_samples:
            density = _PeriodicDensity(ang, bins, sigma_bins)
            ref.rama[cls] = (density, float(np.percentile(density.logpdf(ang), lower)))

    chi1, chi2 = sidechain_dihedrals(reference)
    names = np.array([canonical_residue_name(r.name)
                      for r in _protein_residues(reference.topology)])
    for name in sorted(set(names.tolist())):
        cols = np.flatnonzero((names == name) & np.isfinite(chi1).all(0))
        if not len(cols):
            continue
        two_d = np.isfinite(chi2[:, cols]).all()
        if two_d:
            ang = np.stack([chi1[:, cols], chi2[:, cols]], axis=-1).reshape(-1, 2)
        else:
            ang = chi1[:, cols].reshape(-1, 1)
        if len(ang) < min_samples:
            continue
        fit_on = ang
        if two_d and name in _SYMMETRIC_CHI2:
            flipped = ang.copy()
            flipped[:, 1] = (flipped[:, 1] + 2 * np.pi) % (2 * np.pi) - np.pi
            fit_on = np.concatenate([ang, flipped])
        density = _PeriodicDensity(fit_on, bins, sigma_bins)
        threshold = float(np.percentile(density.logpdf(ang), lower))
        ref.rotamer[name] = (density, threshold, 2 if two_d else 1)
    return ref


@dataclass
class AllAtomCriteria:
    """Everything needed to judge all-atom validity, fitted once on the reference MD.

    Attributes
    ----------
    dihedrals : DihedralReference
    max_clashscore : float
        Clashes per 1000 heavy atoms allowed in a frame.
    max_rama_fraction, max_rotamer_fraction : float
        Largest fraction of judged residues that may be outliers in a frame.
    peptide_bond_nm : float, nm
        Longest allowed C(i)–N(i+1) distance.
    peptide_gaps : np.ndarray, shape=(n_gaps,), int
        Cα-list positions i whose bond to i+1 is a gap in the initial structure (exempt).
    percentile : float
    """

    dihedrals: DihedralReference
    max_clashscore: float
    max_rama_fraction: float
    max_rotamer_fraction: float
    peptide_bond_nm: float = PEPTIDE_BOND_NM
    peptide_gaps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    percentile: float = 99.0

    def as_dict(self) -> dict:
        """The thresholds as plain numbers, for reports."""
        return {
            "percentile": self.percentile,
            "max_clashscore_per_1000_atoms": self.max_clashscore,
            "max_ramachandran_outlier_fraction": self.max_rama_fraction,
            "max_rotamer_outlier_fraction": self.max_rotamer_fraction,
            "peptide_bond_max_nm": self.peptide_bond_nm,
            "clash_overlap_nm": CLASH_OVERLAP_NM,
            "hbond_min_distance_nm": HBOND_MIN_NM,
            "ramachandran_classes_judged": sorted(self.dihedrals.rama),
            "rotamer_residue_types_judged": sorted(self.dihedrals.rotamer),
        }


class AllAtomValidity(NamedTuple):
    """Per-frame all-atom checks; arrays of shape (n_frames,)."""

    peptide_ok: np.ndarray
    clashscore: np.ndarray
    clash_ok: np.ndarray
    rama_fraction: np.ndarray
    rama_ok: np.ndarray
    rotamer_fraction: np.ndarray
    rotamer_ok: np.ndarray
    valid: np.ndarray


def _outlier_fraction(outlier: np.ndarray, judged: np.ndarray) -> np.ndarray:
    if not judged.any():
        return np.zeros(len(outlier))
    return outlier[:, judged].mean(axis=1)


def fit_allatom_criteria(reference: md.Trajectory, percentile: float = 99.0,
                         peptide_bond_nm: float = PEPTIDE_BOND_NM,
                         **density_kwargs) -> AllAtomCriteria:
    """Fit all-atom validity thresholds on the reference MD (the oracle).

    Parameters
    ----------
    reference : mdtraj.Trajectory
        All-atom reference MD; frame 0 is the initial structure.
    percentile : float
        Percentile of the reference's per-frame scores used as the pass threshold (default 99).
    peptide_bond_nm : float, nm
        Peptide C-N threshold (default 0.140 nm); raised to the reference's ``percentile`` of the
        per-frame longest peptide bond when that is longer, so the MD oracle itself passes.
    **density_kwargs
        Passed to :func:`fit_dihedral_reference` (``bins``, ``sigma_deg``, ``min_samples``).

    Returns
    -------
    AllAtomCriteria
    """
    if not is_all_atom(reference.topology):
        raise ValueError("the reference has no full backbone and side chains; all-atom "
                         "criteria need an all-atom reference trajectory.")
    dihedrals = fit_dihedral_reference(reference, percentile, **density_kwargs)
    rama = _outlier_fraction(*dihedrals.ramachandran_outliers(reference))
    rot = _outlier_fraction(*dihedrals.rotamer_outliers(reference))
    clash = heavy_atom_clashscore(reference)
    _, pos = peptide_bond_atoms(reference.topology)
    gaps = pos[peptide_bond_lengths(reference[0])[0] > PEPTIDE_GAP_NM]
    # The absolute limit is raised to the oracle's own percentile of the per-frame longest bond:
    # thermal C-N fluctuations (~0.002 nm) put 15-25% of real MD frames of a 48-residue protein
    # above 0.140 nm somewhere, and a criterion that fails the MD oracle measures nothing.
    lengths = peptide_bond_lengths(reference)
    checked = ~np.isin(pos, gaps)
    if checked.any():
        oracle = float(np.percentile(lengths[:, checked].max(axis=1), percentile))
        peptide_bond_nm = max(peptide_bond_nm, oracle)
    return AllAtomCriteria(
        dihedrals=dihedrals,
        max_clashscore=float(np.percentile(clash, percentile)),
        max_rama_fraction=float(np.percentile(rama, percentile)),
        max_rotamer_fraction=float(np.percentile(rot, percentile)),
        peptide_bond_nm=peptide_bond_nm,
        peptide_gaps=gaps,
        percentile=percentile,
    )


def allatom_validity(traj: md.Trajectory, criteria: AllAtomCriteria) -> AllAtomValidity:
    """All-atom validity of every frame against criteria fitted on the reference MD.

    Parameters
    ----------
    traj : mdtraj.Trajectory
        All-atom trajectory of the same protein as the reference.
    criteria : AllAtomCriteria
        From :func:`fit_allatom_criteria`.

    Returns
    -------
    AllAtomValidity
        Per-frame flags and scores; ``valid`` is the conjunction of the four checks.
    """
    lengths = peptide_bond_lengths(traj)
    _, pos = peptide_bond_atoms(traj.topology)
    checked = ~np.isin(pos, criteria.peptide_gaps)
    peptide_ok = ~(lengths[:, checked] > criteria.peptide_bond_nm).any(axis=1)
    clashscore = heavy_atom_clashscore(traj)
    rama = _outlier_fraction(*criteria.dihedrals.ramachandran_outliers(traj))
    rot = _outlier_fraction(*criteria.dihedrals.rotamer_outliers(traj))
    clash_ok = clashscore <= criteria.max_clashscore
    rama_ok = rama <= criteria.max_rama_fraction
    rot_ok = rot <= criteria.max_rotamer_fraction
    return AllAtomValidity(
        peptide_ok=peptide_ok, clashscore=clashscore, clash_ok=clash_ok,
        rama_fraction=rama, rama_ok=rama_ok, rotamer_fraction=rot, rotamer_ok=rot_ok,
        valid=peptide_ok & clash_ok & rama_ok & rot_ok,
    )
