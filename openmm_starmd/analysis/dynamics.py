"""Dynamic fidelity: do generated trajectories move like the reference MD, in time units?

STAR-MD's dynamics metrics follow MDGen's analysis of time-lagged behaviour: a TICA model is
fitted on the reference MD, generated frames are projected on it, and slow-mode statistics
(TIC0 distribution, its autocorrelation) are compared; the paper adds curves of RMSD versus lag,
an autocorrelation in a PCA space, VAMP-2 scores and decorrelation times, each reported as the
deviation of the generated trajectory from the reference MD. Lags are always given in
nanoseconds and converted to frames with each trajectory's own frame spacing, so a model that
samples every 1 ns is compared fairly with MD saved every 10 ps.

Definitions and the choices made where the papers are silent:

- **Features**: aligned Cα coordinates projected on the leading ``n_pcs`` (default 32, fewer
  if the reference has fewer) reference principal components, in nm. These work for Cα-only
  baselines as well as all-atom trajectories and keep TICA well conditioned on short references.
- **TICA** (deeptime, kinetic-map scaling) is fitted on the reference alone at ``lag_ns``.
- **Valid transitions**: only pairs of frames (t, t+k) whose two ends are both valid enter any
  time-lagged statistic; TICA/VAMP see the valid stretches as separate trajectories.
- **Lag grid**: up to ``n_lags`` log-spaced multiples of the coarser frame spacing, from one
  frame to half the shorter trajectory; each lag is rounded to whole frames per trajectory.
- **Autocorrelation** of a (multi-dimensional) signal x about a centre μ, over the valid pairs
  P(τ) = {(t, t+τ)}: C(τ) = Σ_P y_t·y_{t+τ} / sqrt(Σ_P |y_t|² Σ_P |y_{t+τ}|²), y = x - μ,
  which is the usual estimate for complete data and stays within [-1, 1] when invalid frames
  thin out the pairs. The centre is the *reference* mean for both trajectories (0 in PC and TIC coordinates), so a generated trajectory stuck away from the
  reference equilibrium shows as slow decorrelation rather than being hidden by re-centring.
- **Decorrelation time**: the first lag at which C(τ) drops below 1/e, linearly interpolated
  (C(0) = 1); NaN if it never does within the lag grid.
- **RMSD vs lag**: mean Cα RMSD after optimal superposition between frames τ apart (at most
  ``max_pairs`` pairs per lag, fixed seed).
- **VAMP-2**: sum of the squared singular values of the Koopman matrix estimated by deeptime
  at the TICA lag on the leading ``vamp_pcs`` (default 10) PC features, each trajectory on its
  own. Fewer features than TICA keep the estimate from saturating on short trajectories (with
  about as many frames as features every singular value approaches 1). deeptime counts the
  constant function, so the score lies in [1, vamp_pcs + 1].
- **Deviations**: the mean absolute difference between generated and reference curves on the
  shared lag grid, and |generated - reference| for scalars.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import pearsonr

from .alignment import ca_xyz, superposed_rmsd
from .coverage import PCA, fit_pca, histogram_jsd, pca_project
from .inputs import lag_frames

__all__ = [
    "valid_segments",
    "lag_grid_ns",
    "autocorrelation",
    "decorrelation_time",
    "rmsd_vs_lag",
    "TICAModel",
    "fit_tica",
    "tica_project",
    "vamp2_score",
    "DynamicsComparison",
    "compare_dynamics",
]


def valid_segments(valid: np.ndarray, min_length: int = 1) -> list[tuple[int, int]]:
    """Maximal runs of consecutive valid frames.

    Parameters
    ----------
    valid : np.ndarray, shape=(n_frames,), bool
    min_length : int
        Shorter runs are dropped.

    Returns
    -------
    list of (start, stop)
        Half-open frame ranges.
    """
    v = np.concatenate([[False], np.asarray(valid, bool), [False]])
    starts = np.flatnonzero(~v[:-1] & v[1:])
    stops = np.flatnonzero(v[:-1] & ~v[1:])
    return [(int(a), int(b)) for a, b in zip(starts, stops) if b - a >= min_length]


def lag_grid_ns(dt_ns: float, reference_dt_ns: float, duration_ns: float,
                n_lags: int = 12) -> np.ndarray:
    """Log-spaced lags shared by two trajectories with different frame spacings.

    Parameters
    ----------
    dt_ns, reference_dt_ns : float, ns
        Frame spacings of the two trajectories.
    duration_ns : float, ns
        Length of the shorter trajectory; lags reach half of it.
    n_lags : int

    Returns
    -------
    np.ndarray, shape=(<= n_lags,), ns
        Multiples of the coarser spacing, at least one.
    """
    step = max(dt_ns, reference_dt_ns)
    kmax = max(1, int(np.floor(duration_ns / 2 / step)))
    k = np.unique(np.round(np.logspace(0, np.log10(kmax), n_lags)).astype(int))
    return k * step


def _frames(lags_ns: np.ndarray, dt_ns: float) -> np.ndarray:
    return np.maximum(1, np.round(np.asarray(lags_ns) / dt_ns).astype(int))


def autocorrelation(x: np.ndarray, lags: np.ndarray, valid: np.ndarray | None = None,
                    center: np.ndarray | float | None = None) -> np.ndarray:
    """Normalised autocorrelation of a (multi-dimensional) time series at given frame lags.

    Parameters
    ----------
    x : np.ndarray, shape=(n_frames,) or (n_frames, n_features)
    lags : np.ndarray, shape=(n_lags,), int
        Lags in frames.
    valid : np.ndarray, shape=(n_frames,), bool, optional
        Only pairs whose two frames are valid count.
    center : array_like, optional
        Centre μ (default: the mean of the valid frames).

    Returns
    -------
    np.ndarray, shape=(n_lags,)
        C(lag); NaN where no valid pair exists.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    valid = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool)
    if not valid.any():
        return np.full(len(lags), np.nan)
    mu = x[valid].mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    y = x - mu
    sq = (y**2).sum(axis=1)
    out = np.full(len(lags), np.nan)
    for n, k in enumerate(np.asarray(lags, int)):
        if k >= len(x):
            continue
        ok = valid[: len(x) - k] & valid[k:]
        head, tail = y[: len(x) - k][ok], y[k:][ok]
        # Normalise over the same pairs (Cauchy-Schwarz keeps |C| <= 1 even when invalid
        # frames leave the two ends of the pairs with different spreads).
        norm = np.sqrt(sq[: len(x) - k][ok].sum() * sq[k:][ok].sum())
        if norm > 0:
            out[n] = (head * tail).sum() / norm
    return out


def decorrelation_time(lags_ns: np.ndarray, acf: np.ndarray,
                       threshold: float = float(np.exp(-1))) -> float:
    """First lag at which an autocorrelation drops below a threshold (linear interpolation).

    Parameters
    ----------
    lags_ns : np.ndarray, shape=(n_lags,), ns
        Increasing lags; C(0) = 1 is assumed before the first.
    acf : np.ndarray, shape=(n_lags,)
    threshold : float
        Default 1/e.

    Returns
    -------
    float, ns
        NaN if the autocorrelation never drops below the threshold.
    """
    t = np.concatenate([[0.0], np.asarray(lags_ns, float)])
    c = np.concatenate([[1.0], np.asarray(acf, float)])
    ok = np.isfinite(c)
    t, c = t[ok], c[ok]
    below = np.flatnonzero(c < threshold)
    if not len(below):
        return float("nan")
    i = below[0]
    t0, t1, c0, c1 = t[i - 1], t[i], c[i - 1], c[i]
    return float(t0 + (c0 - threshold) / (c0 - c1) * (t1 - t0))


def rmsd_vs_lag(traj, lags: np.ndarray, valid: np.ndarray | None = None,
                max_pairs: int = 2000, seed: int = 0) -> np.ndarray:
    """Mean Cα RMSD between frames a given number of frames apart.

    Parameters
    ----------
    traj : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    lags : np.ndarray, shape=(n_lags,), int
        Lags in frames.
    valid : np.ndarray, shape=(n_frames,), bool, optional
    max_pairs : int
        Pairs per lag, subsampled without replacement beyond this.
    seed : int

    Returns
    -------
    np.ndarray, shape=(n_lags,), nm
        NaN where no valid pair exists.
    """
    xyz = ca_xyz(traj)
    valid = np.ones(len(xyz), bool) if valid is None else np.asarray(valid, bool)
    rng = np.random.default_rng(seed)
    out = np.full(len(lags), np.nan)
    for n, k in enumerate(np.asarray(lags, int)):
        if k < 1 or k >= len(xyz):
            continue
        t = np.flatnonzero(valid[:-k] & valid[k:])
        if not len(t):
            continue
        if len(t) > max_pairs:
            t = np.sort(rng.choice(t, size=max_pairs, replace=False))
        out[n] = superposed_rmsd(xyz[t], xyz[t + k]).mean()
    return out


def _segments(x: np.ndarray, valid: np.ndarray | None, lag: int) -> list[np.ndarray]:
    valid = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool)
    return [x[a:b] for a, b in valid_segments(valid, lag + 2)]


class TICAModel(NamedTuple):
    """A TICA model fitted on reference PC features.

    Attributes
    ----------
    pca : PCA
        Reference PCA whose leading ``n_pcs`` projections are the features.
    n_pcs : int
    koopman : deeptime.decomposition.CovarianceKoopmanModel
    lag_ns : float, ns
    """

    pca: PCA
    n_pcs: int
    koopman: object
    lag_ns: float


def fit_tica(reference, dt_ns: float, lag_ns: float, n_pcs: int = 32,
             pca: PCA | None = None, label: str = "reference") -> TICAModel:
    """Fit TICA on a reference trajectory at a lag given in ns.

    Parameters
    ----------
    reference : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    dt_ns : float, ns
        Frame spacing of the reference.
    lag_ns : float, ns
    n_pcs : int
        Reference PCs used as features (default 32).
    pca : PCA, optional
        Precomputed :func:`~openmm_starmd.analysis.coverage.fit_pca` of the reference.
    label : str
        Name used in error messages.

    Returns
    -------
    TICAModel
    """
    pca = fit_pca(reference) if pca is None else pca
    n_pcs = min(n_pcs, len(pca.components))
    feats = pca_project(pca, reference, n_pcs)
    k = lag_frames(lag_ns, dt_ns, len(feats), label, "TICA lag")
    from deeptime.decomposition import TICA  # deferred: importing deeptime takes seconds

    koopman = TICA(lagtime=k).fit(feats).fetch_model()
    return TICAModel(pca=pca, n_pcs=n_pcs, koopman=koopman, lag_ns=lag_ns)


def tica_project(model: TICAModel, traj) -> np.ndarray:
    """Project a trajectory onto the TICA components of a reference model.

    Returns
    -------
    np.ndarray, shape=(n_frames, n_tics)
        TIC coordinates; TIC0 is the slowest.
    """
    return model.koopman.transform(pca_project(model.pca, traj, model.n_pcs))


def vamp2_score(features: np.ndarray, lag: int, valid: np.ndarray | None = None,
                dim: int | None = None) -> float:
    """VAMP-2 score of a feature time series at a lag in frames (deeptime).

    Parameters
    ----------
    features : np.ndarray, shape=(n_frames, n_features)
    lag : int
        Lag in frames.
    valid : np.ndarray, shape=(n_frames,), bool, optional
        Only stretches of valid frames are used.
    dim : int, optional
        Leading singular values summed (default all; the constant function is included).

    Returns
    -------
    float
        NaN if no valid stretch is longer than the lag.
    """
    segs = _segments(np.asarray(features, float), valid, lag)
    if not segs:
        return float("nan")
    from deeptime.decomposition import VAMP  # deferred: importing deeptime takes seconds

    model = VAMP(lagtime=lag).fit(segs if len(segs) > 1 else segs[0]).fetch_model()
    k = model.output_dimension if dim is None else min(dim, model.output_dimension)
    return float(model.score(2, dim=k))


class DynamicsComparison(NamedTuple):
    """Reference-vs-generated dynamics: curves for plots and scalars for the report.

    Curves share ``lags_ns``; ``*_ref`` and ``*_gen`` are the two trajectories.
    """

    lags_ns: np.ndarray
    tic0_ref: np.ndarray
    tic0_gen: np.ndarray
    tic0_acf_ref: np.ndarray
    tic0_acf_gen: np.ndarray
    pc_acf_ref: np.ndarray
    pc_acf_gen: np.ndarray
    rmsd_lag_ref: np.ndarray
    rmsd_lag_gen: np.ndarray
    scalars: dict


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(pearsonr(a[ok], b[ok])[0])


def _mean_abs_dev(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[ok] - b[ok]).mean()) if ok.any() else float("nan")


def compare_dynamics(reference, generated, dt_ns: float, reference_dt_ns: float,
                     lag_ns: float, valid: np.ndarray | None = None, n_pcs: int = 32,
                     bins: int = 10, n_lags: int = 12, vamp_pcs: int = 10,
                     pca: PCA | None = None, seed: int = 0,
                     labels: tuple[str, str] = ("reference", "generated")) -> DynamicsComparison:
    """Every dynamics metric of a generated trajectory against the reference MD.

    Parameters
    ----------
    reference, generated : mdtraj.Trajectory or np.ndarray, shape=(n_frames, n_residues, 3), nm
    dt_ns : float, ns
        Frame spacing of ``generated``.
    reference_dt_ns : float, ns
        Frame spacing of ``reference``.
    lag_ns : float, ns
        TICA and VAMP lag.
    valid : np.ndarray, shape=(n_generated_frames,), bool, optional
        Valid generated frames; only valid transitions are used.
    n_pcs, bins, n_lags, vamp_pcs : int
        Feature PCs, TIC0 histogram bins, lag-grid size, PCs used for VAMP-2.
    pca : PCA, optional
        Precomputed reference PCA.
    seed : int
    labels : (str, str)
        Names used in error messages.

    Returns
    -------
    DynamicsComparison
    """
    ref_label, gen_label = labels
    model = fit_tica(reference, reference_dt_ns, lag_ns, n_pcs, pca, ref_label)
    gen_xyz = ca_xyz(generated)
    ref_xyz = ca_xyz(reference)
    valid = np.ones(len(gen_xyz), bool) if valid is None else np.asarray(valid, bool)
    k_gen = lag_frames(lag_ns, dt_ns, len(gen_xyz), gen_label, "TICA lag")
    k_ref = int(round(lag_ns / reference_dt_ns))

    ref_feat = pca_project(model.pca, ref_xyz, model.n_pcs)
    gen_feat = pca_project(model.pca, gen_xyz, model.n_pcs)
    ref_tic = model.koopman.transform(ref_feat)[:, 0]
    gen_tic = model.koopman.transform(gen_feat)[:, 0]
    ref_tic_center = float(ref_tic.mean())

    duration = min(len(ref_xyz) * reference_dt_ns, len(gen_xyz) * dt_ns)
    lags_ns = lag_grid_ns(dt_ns, reference_dt_ns, duration, n_lags)
    lr, lg = _frames(lags_ns, reference_dt_ns), _frames(lags_ns, dt_ns)

    tic_acf_ref = autocorrelation(ref_tic, lr, center=ref_tic_center)
    tic_acf_gen = autocorrelation(gen_tic, lg, valid, center=ref_tic_center)
    pc_center = np.zeros(ref_feat.shape[1])  # projections are centred on the reference mean
    pc_acf_ref = autocorrelation(ref_feat, lr, center=pc_center)
    pc_acf_gen = autocorrelation(gen_feat, lg, valid, center=pc_center)
    rmsd_ref = rmsd_vs_lag(ref_xyz, lr, seed=seed)
    rmsd_gen = rmsd_vs_lag(gen_xyz, lg, valid, seed=seed)

    vamp_ref = vamp2_score(ref_feat[:, :vamp_pcs], k_ref)
    vamp_gen = vamp2_score(gen_feat[:, :vamp_pcs], k_gen, valid)
    at_lag_ref = autocorrelation(ref_tic, np.array([k_ref]), center=ref_tic_center)[0]
    at_lag_gen = autocorrelation(gen_tic, np.array([k_gen]), valid, center=ref_tic_center)[0]
    gen_tic_valid = gen_tic[valid]
    decor = {
        "tic0_decorrelation_ns_reference": decorrelation_time(lags_ns, tic_acf_ref),
        "tic0_decorrelation_ns_generated": decorrelation_time(lags_ns, tic_acf_gen),
        "pc_decorrelation_ns_reference": decorrelation_time(lags_ns, pc_acf_ref),
        "pc_decorrelation_ns_generated": decorrelation_time(lags_ns, pc_acf_gen),
    }
    scalars = {
        "tica_lag_ns": float(lag_ns),
        "n_feature_pcs": int(model.n_pcs),
        "n_vamp_pcs": int(min(vamp_pcs, model.n_pcs)),
        "n_valid_transitions_at_tica_lag": int((valid[:-k_gen] & valid[k_gen:]).sum()),
        "tic0_jsd": (histogram_jsd(ref_tic, gen_tic_valid, bins) if len(gen_tic_valid)
                     else float("nan")),
        "tic0_acf_at_lag_reference": float(at_lag_ref),
        "tic0_acf_at_lag_generated": float(at_lag_gen),
        "tic0_acf_pearson_r": _pearson(tic_acf_ref, tic_acf_gen),
        "tic0_acf_deviation": _mean_abs_dev(tic_acf_ref, tic_acf_gen),
        "pc_acf_deviation": _mean_abs_dev(pc_acf_ref, pc_acf_gen),
        "rmsd_vs_lag_deviation_nm": _mean_abs_dev(rmsd_ref, rmsd_gen),
        "vamp2_reference": vamp_ref,
        "vamp2_generated": vamp_gen,
        "vamp2_deviation": (abs(vamp_gen - vamp_ref) if np.isfinite(vamp_gen)
                            and np.isfinite(vamp_ref) else float("nan")),
        **decor,
    }
    return DynamicsComparison(
        lags_ns=lags_ns, tic0_ref=ref_tic, tic0_gen=gen_tic_valid,
        tic0_acf_ref=tic_acf_ref, tic0_acf_gen=tic_acf_gen,
        pc_acf_ref=pc_acf_ref, pc_acf_gen=pc_acf_gen,
        rmsd_lag_ref=rmsd_ref, rmsd_lag_gen=rmsd_gen, scalars=scalars,
    )

