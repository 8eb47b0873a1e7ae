"""Conformational coverage: how well generated frames cover the reference MD ensemble.

STAR-MD's coverage table follows the ATLAS ensemble metrics of AlphaFlow (Jing et al. 2024)
and MDGen (Jing et al. 2024): PCA of the reference Cα coordinates with JSD and recall of the
generated frames in that space, per-residue RMSF and its Pearson r against the reference, mean
pairwise RMSD, a Wasserstein-2 distance in PCA space, and the Jaccard overlap of weak and
transient Cα contacts. All functions take mdtraj Trajectories (or Cα coordinate arrays of
shape (n_frames, n_residues, 3) in nm) and superpose everything on the Cα atoms of the first
reference frame before measuring.

Definitions and the choices made where the papers are silent:

- **PCA**: principal components of the reference's flattened aligned Cα coordinates (3N
  features), by eigen-decomposition of the covariance (or, for fewer frames than features,
  the Gram) matrix. The sign of each component is fixed (largest |loading| positive) so
  results do not flip between runs.
- **JSD**: for each of the first ``n_pcs`` PCs (default 2), 10-bin histograms of reference and
  generated projections over the range spanned by both; the Jensen–Shannon *divergence* in
  base 2 (0 = identical, 1 = disjoint). The headline value is the mean over PCs.
- **Recall**: on the same bins, the fraction of reference frames that fall in bins the
  generated frames also visit (1 = every reference region is reached), averaged over PCs.
- **RMSF**: per-residue root-mean-square fluctuation of aligned Cα positions about their mean
  (nm); compared to the reference with Pearson's r.
- **Pairwise RMSD**: mean Cα RMSD, after optimal superposition of each pair, over all pairs of
  distinct frames (at most ``max_frames`` frames, drawn without replacement with a fixed seed).
- **PCA W2**: the 2-Wasserstein distance between the reference and generated point clouds on
  the first ``n_pcs`` reference PCs, in RMSD units (PC distance / sqrt(n_residues), nm), as in
  AlphaFlow's "MD PCA W2". The two sets are subsampled to equal size n = min(n_ref, n_gen,
  max_samples) without replacement (fixed seed) and matched exactly by
  ``scipy.optimize.linear_sum_assignment`` on squared distances; W2 = sqrt(mean matched cost).
- **Contacts** (AlphaFlow's definitions): a Cα pair is in contact below 0.8 nm. Against the
  initial structure (first reference frame): *weak contacts* are pairs in contact initially
  but present in fewer than 90% of an ensemble's frames; *transient contacts* are pairs not in
  contact initially but present in more than 10% of frames. The Jaccard index |A∩B|/|A∪B|
  compares the reference's and generated sets; NaN when both sets are empty (0/0).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import mdtraj as md
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr

from .alignment import aligned_ca, ca_xyz, superposed_rmsd

__all__ = [
    "PCA",
    "fit_pca",
    "pca_project",
    "histogram_jsd",
    "pca_jsd",
    "pca_recall",
    "rmsf",
    "rmsf_correlation",
    "mean_pairwise_rmsd",
    "pca_w2",
    "contact_probabilities",
    "ContactJaccard",
    "contact_jaccard",
]

CONTACT_NM = 0.8


class PCA(NamedTuple):
    """Principal components of reference Cα coordinates.

    Attributes
    ----------
    target : np.ndarray, shape=(n_residues, 3), nm
        Alignment target (the first reference frame's Cα atoms).
    mean : np.ndarray, shape=(3 * n_residues,), nm
    components : np.ndarray, shape=(n_components, 3 * n_residues)
        Orthonormal rows, by decreasing variance.
    variance : np.ndarray, shape=(n_components,), nm^2
        Variance of the reference along each component.
    """

    target: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray


def _reference_target(reference) -> np.ndarray:
    return ca_xyz(reference[:1] if isinstance(reference, md.Trajectory) else reference)[0]


def fit_pca(reference: md.Trajectory | np.ndarray, n_components: int | None = None) -> PCA:
    """Fit PCA on the aligned Cα coordinates of a reference trajectory.

    Parameters
    ----------
    reference : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    n_components : int, optional
        Components to keep (default: all, at most min(n_frames, 3 * n_residues)).

    Returns
    -------
    PCA
    """
    target = _reference_target(reference)
    xyz = aligned_ca(reference, target).reshape(-1, target.size)
    mean = xyz.mean(axis=0)
    x = xyz - mean
    # Eigen-decompose the smaller of the covariance (D x D) and Gram (F x F) matrices: for
    # long trajectories this is much cheaper than an SVD of the F x D data matrix.
    if x.shape[1] <= x.shape[0]:
        w, v = np.linalg.eigh(x.T @ x)
        order = np.argsort(w)[::-1]
        w, vt = np.clip(w[order], 0, None), v[:, order].T
    else:
        w, u = np.linalg.eigh(x @ x.T)
        order = np.argsort(w)[::-1]
        w, u = w[order], u[:, order]
        keep = w > 1e-12 * max(w.max(), 1e-300)
        w, u = w[keep], u[:, keep]
        vt = (x.T @ u / np.sqrt(w)).T
    k = len(w) if n_components is None else min(n_components, len(w))
    comps = vt[:k]
    # Fix each component's sign so projections are reproducible.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    variance = w[:k] / max(len(xyz) - 1, 1)
    return PCA(target=target, mean=mean, components=comps, variance=variance)


def pca_project(pca: PCA, traj: md.Trajectory | np.ndarray,
                n_pcs: int | None = None) -> np.ndarray:
    """Project a trajectory onto reference principal components (after alignment).

    Parameters
    ----------
    pca : PCA
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    n_pcs : int, optional
        Number of leading components (default: all fitted).

    Returns
    -------
    np.ndarray, shape=(n_frames, n_pcs), nm
    """
    xyz = aligned_ca(traj, pca.target).reshape(-1, pca.target.size)
    comps = pca.components if n_pcs is None else pca.components[:n_pcs]
    return (xyz - pca.mean) @ comps.T


def _joint_edges(a: np.ndarray, b: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        hi = lo + 1e-9
    return np.linspace(lo, hi, bins + 1)


def histogram_jsd(a: np.ndarray, b: np.ndarray, bins: int = 10) -> float:
    """Jensen–Shannon divergence (base 2) of two 1-D samples on shared histogram bins.

    Parameters
    ----------
    a, b : np.ndarray, shape=(n,) and (m,)
    bins : int
        Equal-width bins over the range spanned by both samples.

    Returns
    -------
    float
        In [0, 1]; 0 for identical histograms.
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    edges = _joint_edges(a, b, bins)
    pa = np.histogram(a, edges)[0].astype(float)
    pb = np.histogram(b, edges)[0].astype(float)
    return float(jensenshannon(pa, pb, base=2) ** 2)


def _projections(reference, generated, n_pcs: int, pca: PCA | None):
    pca = fit_pca(reference) if pca is None else pca
    n_pcs = min(n_pcs, len(pca.components))
    return pca_project(pca, reference, n_pcs), pca_project(pca, generated, n_pcs)


def pca_jsd(reference, generated, n_pcs: int = 2, bins: int = 10,
            pca: PCA | None = None) -> np.ndarray:
    """JSD between reference and generated projections on each of the leading reference PCs.

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    n_pcs : int
        Leading PCs to compare (default 2).
    bins : int
        Histogram bins per PC (default 10).
    pca : PCA, optional
        Precomputed :func:`fit_pca` of the reference.

    Returns
    -------
    np.ndarray, shape=(n_pcs,)
        Base-2 JS divergence per PC, each in [0, 1].
    """
    ref, gen = _projections(reference, generated, n_pcs, pca)
    return np.array([histogram_jsd(ref[:, k], gen[:, k], bins) for k in range(ref.shape[1])])


def pca_recall(reference, generated, n_pcs: int = 2, bins: int = 10,
               pca: PCA | None = None) -> np.ndarray:
    """Fraction of reference frames in histogram bins that generated frames also visit, per PC.

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    n_pcs, bins : int
        As in :func:`pca_jsd`.
    pca : PCA, optional

    Returns
    -------
    np.ndarray, shape=(n_pcs,)
        Each in [0, 1]; 1 when the generated frames reach every region the reference visits.
    """
    ref, gen = _projections(reference, generated, n_pcs, pca)
    out = []
    for k in range(ref.shape[1]):
        edges = _joint_edges(ref[:, k], gen[:, k], bins)
        pr = np.histogram(ref[:, k], edges)[0]
        pg = np.histogram(gen[:, k], edges)[0]
        out.append(pr[pg > 0].sum() / pr.sum())
    return np.array(out, dtype=float)


def rmsf(traj: md.Trajectory | np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Per-residue Cα RMSF after superposition on a target structure.

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    target : np.ndarray, shape=(n_residues, 3), nm, optional
        Alignment target (default: the trajectory's own first frame).

    Returns
    -------
    np.ndarray, shape=(n_residues,), nm
    """
    xyz = ca_xyz(traj)
    xyz = aligned_ca(xyz, xyz[0] if target is None else target)
    return np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))


def rmsf_correlation(reference, generated) -> float:
    """Pearson r between reference and generated per-residue Cα RMSF profiles.

    Both are aligned to the first reference frame. NaN if either profile is constant.

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm

    Returns
    -------
    float
    """
    target = _reference_target(reference)
    a, b = rmsf(reference, target), rmsf(generated, target)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(pearsonr(a, b)[0])


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


def mean_pairwise_rmsd(traj: md.Trajectory | np.ndarray, max_frames: int = 500,
                       seed: int = 0) -> float:
    """Mean Cα RMSD (optimal superposition per pair) over pairs of distinct frames.

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    max_frames : int
        At most this many frames are used, drawn without replacement.
    seed : int

    Returns
    -------
    float, nm
        NaN for fewer than two frames.
    """
    xyz = ca_xyz(traj)
    xyz = xyz[_subsample(len(xyz), max_frames, np.random.default_rng(seed))]
    if len(xyz) < 2:
        return float("nan")
    i, j = np.triu_indices(len(xyz), k=1)
    return float(superposed_rmsd(xyz[i], xyz[j]).mean())


def pca_w2(reference, generated, n_pcs: int = 2, max_samples: int = 500, seed: int = 0,
           pca: PCA | None = None) -> float:
    """2-Wasserstein distance between ensembles on the leading reference PCs (RMSD units).

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    n_pcs : int
        Leading PCs (default 2, as AlphaFlow).
    max_samples : int
        Largest matched set size; larger ensembles are subsampled without replacement.
    seed : int
    pca : PCA, optional

    Returns
    -------
    float, nm
        0 for identical ensembles.
    """
    ref, gen = _projections(reference, generated, n_pcs, pca)
    n_res = (pca.target if pca is not None else _reference_target(reference)).shape[0]
    k = min(len(ref), len(gen), max_samples)
    # One generator per set, same seed: equal-length ensembles get the same frame indices,
    # so identical ensembles give exactly 0 even when subsampled.
    ref = ref[_subsample(len(ref), k, np.random.default_rng(seed))]
    gen = gen[_subsample(len(gen), k, np.random.default_rng(seed))]
    cost = ((ref[:, None, :] - gen[None, :, :]) ** 2).sum(-1) / n_res
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def contact_probabilities(traj: md.Trajectory | np.ndarray,
                          cutoff_nm: float = CONTACT_NM) -> np.ndarray:
    """Fraction of frames in which each Cα pair is closer than a cutoff.

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    cutoff_nm : float, nm
        Default 0.8 nm.

    Returns
    -------
    np.ndarray, shape=(n_residues, n_residues)
    """
    xyz = ca_xyz(traj)
    n = xyz.shape[1]
    acc = np.zeros((n, n))
    step = max(1, 4_000_000 // (n * n))  # bound the (frames, n, n, 3) temporary to ~100 MB
    for s in range(0, len(xyz), step):
        diff = xyz[s : s + step, :, None] - xyz[s : s + step, None, :]
        acc += ((diff**2).sum(axis=-1) < cutoff_nm**2).sum(axis=0)
    return acc / len(xyz)


class ContactJaccard(NamedTuple):
    """Jaccard indices of weak and transient contact sets (NaN when both sets are empty)."""

    weak: float
    transient: float


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else float("nan")


def contact_jaccard(reference, generated, initial=None, cutoff_nm: float = CONTACT_NM,
                    weak_below: float = 0.9, transient_above: float = 0.1) -> ContactJaccard:
    """Jaccard overlap of weak and transient Cα contacts (AlphaFlow's definitions).

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    initial : mdtraj.Trajectory or np.ndarray, optional
        Structure defining the initial contacts (default: first reference frame).
    cutoff_nm : float, nm
        Contact cutoff (default 0.8 nm).
    weak_below : float
        Initial contacts present in fewer than this fraction of frames are weak (default 0.9).
    transient_above : float
        Non-initial contacts present in more than this fraction of frames are transient
        (default 0.1).

    Returns
    -------
    ContactJaccard
    """
    init = _reference_target(reference) if initial is None else ca_xyz(initial)[0]
    n = init.shape[0]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    init_contact = (np.linalg.norm(init[:, None] - init[None], axis=-1) < cutoff_nm) & upper
    p_ref = contact_probabilities(reference, cutoff_nm)
    p_gen = contact_probabilities(generated, cutoff_nm)
    weak_ref, weak_gen = init_contact & (p_ref < weak_below), init_contact & (p_gen < weak_below)
    non_init = upper & ~init_contact
    tr_ref, tr_gen = non_init & (p_ref > transient_above), non_init & (p_gen > transient_above)
    return ContactJaccard(weak=_jaccard(weak_ref, weak_gen), transient=_jaccard(tr_ref, tr_gen))
