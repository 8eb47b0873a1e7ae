"""The PNG figures of an evaluation report, drawn with matplotlib's Agg canvas.

One function per figure of STAR-MD-style analysis: RMSF profiles, the PCA scatter with its
marginal densities, TIC0 histograms, RMSD-vs-lag and autocorrelation curves, and validity along
time. Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of
pyplot, so plotting never changes the caller's global backend or leaks open figures.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_rmsf",
    "plot_pca",
    "plot_tic0",
    "plot_lag_curves",
    "plot_validity_over_time",
]

REF_STYLE = {"color": "0.25", "label": "reference MD"}
GEN_STYLE = {"color": "tab:orange", "label": "generated"}


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_rmsf(path: str, rmsf_ref_nm: np.ndarray, rmsf_gen_nm: np.ndarray) -> None:
    """Per-residue Cα RMSF of reference and generated ensembles.

    Parameters
    ----------
    path : str
        PNG file to write.
    rmsf_ref_nm, rmsf_gen_nm : np.ndarray, shape=(n_residues,), nm
    """
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    res = np.arange(len(rmsf_ref_nm))
    ax.plot(res, rmsf_ref_nm, **REF_STYLE)
    ax.plot(res, rmsf_gen_nm, **GEN_STYLE)
    ax.set_xlabel("residue")
    ax.set_ylabel("Cα RMSF (nm)")
    ax.legend(frameon=False)
    _save(fig, path)


def plot_pca(path: str, proj_ref: np.ndarray, proj_gen: np.ndarray, bins: int = 10) -> None:
    """Scatter on the first two reference PCs with the marginal densities of each.

    Parameters
    ----------
    path : str
    proj_ref, proj_gen : np.ndarray, shape=(n_frames, >=1), nm
        Projections on the reference PCs.
    bins : int
        Histogram bins of the marginals (the JSD bins).
    """
    fig = Figure(figsize=(10, 3.4))
    ax_sc, ax1, ax2 = fig.subplots(1, 3)
    y_ref = proj_ref[:, 1] if proj_ref.shape[1] > 1 else np.zeros(len(proj_ref))
    y_gen = proj_gen[:, 1] if proj_gen.shape[1] > 1 else np.zeros(len(proj_gen))
    ax_sc.scatter(proj_ref[:, 0], y_ref, s=4, alpha=0.5, **REF_STYLE)
    ax_sc.scatter(proj_gen[:, 0], y_gen, s=4, alpha=0.5, **GEN_STYLE)
    ax_sc.set_xlabel("PC1 (nm)")
    ax_sc.set_ylabel("PC2 (nm)")
    ax_sc.legend(frameon=False, markerscale=3)
    for ax, k in ((ax1, 0), (ax2, 1)):
        if proj_ref.shape[1] <= k or not len(proj_gen):
            ax.set_axis_off()
            continue
        a, b = proj_ref[:, k], proj_gen[:, k]
        edges = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()) + 1e-12, bins + 1)
        ax.hist(a, edges, density=True, histtype="step", **REF_STYLE)
        ax.hist(b, edges, density=True, histtype="step", **GEN_STYLE)
        ax.set_xlabel(f"PC{k + 1} (nm)")
        ax.set_ylabel("density")
    _save(fig, path)


def plot_tic0(path: str, tic0_ref: np.ndarray, tic0_gen: np.ndarray, bins: int = 10) -> None:
    """Histograms of the slowest TICA coordinate for reference and generated frames."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    both = np.concatenate([tic0_ref, tic0_gen])
    edges = np.linspace(both.min(), both.max() + 1e-12, bins + 1)
    ax.hist(tic0_ref, edges, density=True, histtype="step", **REF_STYLE)
    if len(tic0_gen):
        ax.hist(tic0_gen, edges, density=True, histtype="step", **GEN_STYLE)
    ax.set_xlabel("TIC0")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    _save(fig, path)


def plot_lag_curves(path: str, lags_ns: np.ndarray, ref: np.ndarray, gen: np.ndarray,
                    ylabel: str) -> None:
    """A reference and a generated curve against lag time (log axis).

    Parameters
    ----------
    path : str
    lags_ns : np.ndarray, shape=(n_lags,), ns
    ref, gen : np.ndarray, shape=(n_lags,)
    ylabel : str
    """
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot(lags_ns, ref, marker="o", ms=3, **REF_STYLE)
    ax.plot(lags_ns, gen, marker="o", ms=3, **GEN_STYLE)
    if len(lags_ns) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("lag (ns)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    _save(fig, path)


def plot_validity_over_time(path: str, block_start_ns: np.ndarray, series: dict) -> None:
    """Fraction of valid frames per time block, one line per validity kind.

    Parameters
    ----------
    path : str
    block_start_ns : np.ndarray, shape=(n_blocks,), ns
    series : dict of str -> np.ndarray, shape=(n_blocks,)
        e.g. {"Cα": ..., "all-atom": ..., "combined": ...}.
    """
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    start = np.asarray(block_start_ns, float)
    width = start[-1] - start[-2] if len(start) > 1 else 1.0
    edges = np.append(start, start[-1] + width)  # close the last block
    for (name, frac), style in zip(series.items(), ("-", "--", ":", "-.")):
        ax.step(edges, np.append(frac, frac[-1]), where="post", linestyle=style, label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time (ns, block start)")
    ax.set_ylabel("fraction valid")
    ax.legend(frameon=False)
    _save(fig, path)
