"""The evaluation report: every STAR-MD metric of one trajectory, and the table over many.

:func:`evaluate` runs validity, coverage and dynamics for one generated trajectory against a
reference MD trajectory and writes ``metrics.json`` plus PNG figures into a report folder.
:func:`evaluate_many` does so for a list of proteins, adds the MD oracle (a second replica) and
the ANM and Gaussian-noise baselines, and prints a STAR-MD-style table of medians over targets.

Choices made where the paper is silent:

- Frames enter coverage and dynamics only if valid. "Valid" is Cα validity AND all-atom
  validity (when both trajectories are all-atom) AND energy validity (when energies are given).
  For Cα-only trajectories (the baselines) only Cα validity applies and the all-atom and
  combined fractions are reported as null.
- The reference MD is never filtered: it defines what is valid.
- The TICA lag defaults to the coarser of the two frame spacings (one model step).
- Reports are written to a temporary sibling folder and renamed into place only when complete,
  so an error never leaves a half-written report; an existing report folder is replaced.
- JSON has no NaN: undefined numbers (e.g. a Jaccard index of two empty sets) are ``null``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Callable

import numpy as np
import mdtraj as md

from . import plots
from .alignment import aligned_ca, ca_xyz
from .baselines import anm_ensemble, gaussian_ensemble
from .coverage import (contact_jaccard, fit_pca, mean_pairwise_rmsd, pca_jsd, pca_project,
                       pca_recall, pca_w2, rmsf, rmsf_correlation)
from .dynamics import compare_dynamics
from .inputs import (InputError, check_finite, check_same_protein, lag_frames,
                     load_trajectory)
from .stereochemistry import (PEPTIDE_BOND_NM, AllAtomCriteria, allatom_validity,
                              fit_allatom_criteria, is_all_atom)
from .validity import (CA_BREAK_NM, CA_CLASH_NM, broken_pairs, ca_validity,
                       energy_validity, to_kj_per_mol, validity_over_time)

__all__ = ["PLOT_FILES", "SUMMARY_COLUMNS", "evaluate", "evaluate_many", "summary_table"]

PLOT_FILES = (
    "rmsf.png",
    "pca.png",
    "tic0.png",
    "rmsd_vs_lag.png",
    "autocorrelation.png",
    "validity_over_time.png",
)

# (summary key, table header, better direction) in the order of STAR-MD's tables.
SUMMARY_COLUMNS = (
    ("ca_validity", "Cα valid ↑", "+"),
    ("allatom_validity", "AA valid ↑", "+"),
    ("combined_validity", "Valid ↑", "+"),
    ("pca_jsd", "PCA JSD ↓", "-"),
    ("pca_recall", "Recall ↑", "+"),
    ("rmsf_pearson_r", "RMSF r ↑", "+"),
    ("pairwise_rmsd_nm", "Pair RMSD (nm)", "="),
    ("pca_w2_nm", "PCA W2 (nm) ↓", "-"),
    ("weak_contacts_jaccard", "Weak J ↑", "+"),
    ("transient_contacts_jaccard", "Trans J ↑", "+"),
    ("tic0_jsd", "TIC0 JSD ↓", "-"),
    ("tic0_acf_pearson_r", "TIC0 ACF r ↑", "+"),
    ("rmsd_vs_lag_deviation_nm", "ΔRMSD(τ) (nm) ↓", "-"),
    ("pc_acf_deviation", "ΔACF ↓", "-"),
    ("vamp2_deviation", "ΔVAMP-2 ↓", "-"),
)


def _clean(obj):
    """Convert numpy types to JSON types, and NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _write_atomically(out_dir: str, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary sibling folder, then move it to ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"report path '{out_dir}' is a file; pass a folder path for the report.")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fraction(mask) -> float | None:
    return None if mask is None else float(np.mean(mask)) if len(mask) else float("nan")


def evaluate(reference: md.Trajectory, generated: md.Trajectory, dt_ns: float,
             out_dir: str | None = None, *, reference_dt_ns: float | None = None,
             tica_lag_ns: float | None = None, energies=None, reference_energies=None,
             labels: tuple[str, str] = ("reference", "generated"), n_pcs: int = 2,
             bins: int = 10, n_feature_pcs: int = 32, n_blocks: int = 10,
             percentile: float = 99.0, peptide_bond_nm: float = PEPTIDE_BOND_NM,
             criteria: AllAtomCriteria | None = None,
             seed: int = 0, make_plots: bool = True) -> dict:
    """Every STAR-MD metric of a generated trajectory against reference MD; optionally a report.

    Parameters
    ----------
    reference : mdtraj.Trajectory
        Reference MD; its first frame is the initial structure and the alignment target.
    generated : mdtraj.Trajectory
        Trajectory to judge (all-atom or Cα-only), same protein.
    dt_ns : float, ns
        Frame spacing of ``generated``.
    out_dir : str, optional
        Report folder to write (``metrics.json`` and :data:`PLOT_FILES`); replaced if present.
    reference_dt_ns : float, ns, optional
        Frame spacing of ``reference`` (default ``dt_ns``).
    tica_lag_ns : float, ns, optional
        TICA/VAMP lag (default: the coarser frame spacing).
    energies, reference_energies : openmm.unit.Quantity or array_like, optional
        Per-frame potential energies (bare numbers in kJ/mol); both needed for energy validity.
    labels : (str, str)
        Names of the two inputs (e.g. file names) used in error messages.
    n_pcs, bins : int
        PCs and histogram bins of the PCA JSD/recall/W2 (default 2 and 10).
    n_feature_pcs : int
        PCs used as dynamics features (default 32).
    n_blocks : int
        Time blocks of the validity-over-time curve.
    percentile : float
        Reference percentile behind the all-atom and energy thresholds (default 99).
    peptide_bond_nm : float, nm
        Longest allowed peptide C–N bond (default 0.140 nm); ignored if ``criteria`` is given.
    criteria : AllAtomCriteria, optional
        Precomputed :func:`fit_allatom_criteria` of the reference (saves refitting), or of other
        all-atom MD of the protein when ``reference`` holds only backbone atoms.
    seed : int
        Seed of every subsampling.
    make_plots : bool
        Write the PNG figures with the JSON.

    Returns
    -------
    dict
        ``{"inputs", "validity", "coverage", "dynamics", "summary"}``; the JSON written.
    """
    ref_label, gen_label = labels
    reference_dt_ns = dt_ns if reference_dt_ns is None else reference_dt_ns
    for name, value in (("dt_ns", dt_ns), ("reference_dt_ns", reference_dt_ns)):
        if not (value and value > 0):
            raise InputError(f"{name} is {value}; pass the frame spacing in ns "
                             "(e.g. --dt-ns 1.0).")
    lag_ns = max(dt_ns, reference_dt_ns) if tica_lag_ns is None else tica_lag_ns
    check_finite(reference, ref_label)
    check_finite(generated, gen_label)
    check_same_protein(reference, generated, ref_label, gen_label)
    if reference.n_frames < 2:
        raise InputError(f"{ref_label} has {reference.n_frames} frame; the reference MD needs "
                         "many frames to define an ensemble.")
    lag_frames(lag_ns, reference_dt_ns, reference.n_frames, ref_label, "TICA lag")
    lag_frames(lag_ns, dt_ns, generated.n_frames, gen_label, "TICA lag")
    if (energies is None) != (reference_energies is None):
        raise InputError("energy validity needs per-frame energies of both trajectories; "
                         "pass both energies and reference_energies (or neither).")
    if energies is not None:
        energies = np.atleast_1d(to_kj_per_mol(energies))
        if len(energies) != generated.n_frames:
            raise InputError(f"energies of {gen_label} have {len(energies)} values for "
                             f"{generated.n_frames} frames; pass one energy per frame.")

    val, valid, blocks = _validity_section(reference, generated, dt_ns, energies,
                                           reference_energies, percentile, peptide_bond_nm,
                                           criteria, n_blocks)
    target = ca_xyz(reference[:1])[0]
    ref_xyz = aligned_ca(reference, target)
    gen_all = aligned_ca(generated, target)
    pca = fit_pca(ref_xyz)
    cov, figs = _coverage_section(ref_xyz, gen_all[valid], target, pca, n_pcs, bins, seed)

    # Dynamics sees every generated frame but uses only transitions between valid ones.
    dyn = compare_dynamics(ref_xyz, gen_all, dt_ns, reference_dt_ns, lag_ns, valid,
                           n_pcs=n_feature_pcs, bins=bins, pca=pca, seed=seed,
                           labels=(ref_label, gen_label))
    dynamics = {
        **dyn.scalars,
        "curves": {
            "lags_ns": dyn.lags_ns,
            "tic0_acf": {"reference": dyn.tic0_acf_ref, "generated": dyn.tic0_acf_gen},
            "pc_acf": {"reference": dyn.pc_acf_ref, "generated": dyn.pc_acf_gen},
            "rmsd_vs_lag_nm": {"reference": dyn.rmsd_lag_ref, "generated": dyn.rmsd_lag_gen},
        },
    }

    merged = {**val, **cov, **dynamics}
    summary = {key: merged.get(key) for key, _, _ in SUMMARY_COLUMNS}
    result = {
        "inputs": {
            "reference": ref_label, "generated": gen_label,
            "n_reference_frames": int(reference.n_frames),
            "n_generated_frames": int(generated.n_frames),
            "n_residues": int(target.shape[0]),
            "dt_ns": float(dt_ns), "reference_dt_ns": float(reference_dt_ns),
            "tica_lag_ns": float(lag_ns),
            "all_atom_checks": val["allatom_validity"] is not None,
            "energy_checks": val["energy_validity"] is not None, "seed": seed,
        },
        "validity": val,
        "coverage": cov,
        "dynamics": dynamics,
        "summary": summary,
    }
    result = _clean(result)

    if out_dir is not None:
        _write_atomically(out_dir, lambda folder: _write_report(
            folder, result, figs, dyn, blocks, bins, make_plots))
    return result


def _validity_section(reference, generated, dt_ns, energies, reference_energies, percentile,
                      peptide_bond_nm, criteria, n_blocks):
    """Per-frame validity of ``generated``: (report dict, valid mask, blocks along time)."""
    gaps = broken_pairs(reference, 0)
    ca = ca_validity(generated, ignore_pairs=gaps)
    aa = None
    # all-atom checks need all-atom generated frames and thresholds: fitted on an all-atom
    # reference, or given (fitted on other all-atom MD of the protein when the reference is a
    # backbone trajectory, e.g. from training shards)
    if is_all_atom(generated.topology) and (criteria is not None or is_all_atom(reference.topology)):
        if criteria is None:
            criteria = fit_allatom_criteria(reference, percentile, peptide_bond_nm)
        aa = allatom_validity(generated, criteria)
    energy_ok = None
    if energies is not None and reference_energies is not None:
        energy_ok = energy_validity(energies, reference_energies, percentile)
    valid = ca.valid.copy()
    if aa is not None:
        valid &= aa.valid
    if energy_ok is not None:
        valid &= energy_ok
    series = {"Cα": ca.valid}
    if aa is not None:
        series["all-atom"] = aa.valid
        series["combined"] = valid
    if energy_ok is not None:
        series["energy"] = energy_ok
    blocks = {k: validity_over_time(v, dt_ns, n_blocks) for k, v in series.items()}
    report = {
        "ca_validity": _fraction(ca.valid),
        "ca_clash_fraction": _fraction(ca.clash),
        "ca_break_fraction": _fraction(ca.broken),
        "allatom_validity": _fraction(aa.valid) if aa else None,
        "peptide_bond_ok_fraction": _fraction(aa.peptide_ok) if aa else None,
        "clash_ok_fraction": _fraction(aa.clash_ok) if aa else None,
        "mean_clashscore": float(aa.clashscore.mean()) if aa else None,
        "ramachandran_ok_fraction": _fraction(aa.rama_ok) if aa else None,
        "mean_ramachandran_outlier_fraction": float(aa.rama_fraction.mean()) if aa else None,
        "rotamer_ok_fraction": _fraction(aa.rotamer_ok) if aa else None,
        "mean_rotamer_outlier_fraction": float(aa.rotamer_fraction.mean()) if aa else None,
        "energy_validity": _fraction(energy_ok),
        "combined_validity": _fraction(valid) if aa is not None else None,
        "n_valid_frames": int(valid.sum()),
        "thresholds": {
            "ca_clash_nm": CA_CLASH_NM, "ca_break_nm": CA_BREAK_NM,
            "ca_gap_pairs_exempt": gaps.tolist(),
            **(criteria.as_dict() if aa is not None else {}),
        },
        "over_time": {"block_start_ns": next(iter(blocks.values()))[0],
                      **{k: v[1] for k, v in blocks.items()}},
        "per_frame_valid": valid,
    }
    return report, valid, blocks


def _coverage_section(ref_xyz, gen_xyz, target, pca, n_pcs, bins, seed):
    """Coverage metrics of the valid generated frames: (report dict, arrays for the figures)."""
    k = max(n_pcs, 2)
    rmsf_ref = rmsf(ref_xyz, target)
    figs = {"rmsf_ref": rmsf_ref, "proj_ref": pca_project(pca, ref_xyz, k)}
    if len(gen_xyz):
        figs["rmsf_gen"] = rmsf(gen_xyz, target)
        figs["proj_gen"] = pca_project(pca, gen_xyz, k)
        jsd = pca_jsd(ref_xyz, gen_xyz, n_pcs, bins, pca)
        recall = pca_recall(ref_xyz, gen_xyz, n_pcs, bins, pca)
        contacts = contact_jaccard(ref_xyz, gen_xyz)
        report = {
            "pca_jsd": float(jsd.mean()), "pca_jsd_per_pc": jsd,
            "pca_recall": float(recall.mean()), "pca_recall_per_pc": recall,
            "rmsf_pearson_r": rmsf_correlation(ref_xyz, gen_xyz),
            "pairwise_rmsd_nm": mean_pairwise_rmsd(gen_xyz, seed=seed),
            "pca_w2_nm": pca_w2(ref_xyz, gen_xyz, n_pcs, seed=seed, pca=pca),
            "weak_contacts_jaccard": contacts.weak,
            "transient_contacts_jaccard": contacts.transient,
        }
    else:
        figs["rmsf_gen"] = np.full_like(rmsf_ref, np.nan)
        figs["proj_gen"] = np.zeros((0, k))
        report = {key: float("nan") for key in (
            "pca_jsd", "pca_recall", "rmsf_pearson_r", "pairwise_rmsd_nm", "pca_w2_nm",
            "weak_contacts_jaccard", "transient_contacts_jaccard")}
    report.update({
        "n_frames_used": int(len(gen_xyz)),
        "n_pcs": n_pcs, "bins": bins,
        "reference_pairwise_rmsd_nm": mean_pairwise_rmsd(ref_xyz, seed=seed),
        "pca_explained_variance_nm2": pca.variance[:k],
        "rmsf_nm": {"reference": rmsf_ref, "generated": figs["rmsf_gen"]},
    })
    return report, figs


def _write_report(folder, result, figs, dyn, blocks, bins, make_plots):
    """metrics.json and (optionally) every PNG of :data:`PLOT_FILES` into ``folder``."""
    with open(os.path.join(folder, "metrics.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    if not make_plots:
        return
    def path(name: str) -> str:
        return os.path.join(folder, name)

    plots.plot_rmsf(path("rmsf.png"), figs["rmsf_ref"], figs["rmsf_gen"])
    plots.plot_pca(path("pca.png"), figs["proj_ref"], figs["proj_gen"], bins)
    plots.plot_tic0(path("tic0.png"), dyn.tic0_ref, dyn.tic0_gen, bins)
    plots.plot_lag_curves(path("rmsd_vs_lag.png"), dyn.lags_ns, dyn.rmsd_lag_ref,
                          dyn.rmsd_lag_gen, "Cα RMSD at lag (nm)")
    plots.plot_lag_curves(path("autocorrelation.png"), dyn.lags_ns, dyn.pc_acf_ref,
                          dyn.pc_acf_gen,
                          f"autocorrelation ({dyn.scalars['n_feature_pcs']}-PC space)")
    first = next(iter(blocks.values()))[0]
    plots.plot_validity_over_time(path("validity_over_time.png"), first,
                                  {k: v[1] for k, v in blocks.items()})


# --- many proteins ------------------------------------------------------------------------

ROWS = ("model", "MD oracle", "ANM", "Gaussian noise")


def _format(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}"


def summary_table(summaries: dict[str, list[dict]]) -> str:
    """Markdown table of per-row medians over targets.

    Parameters
    ----------
    summaries : dict of str -> list of dict
        For each row name, the ``summary`` dicts of its targets.

    Returns
    -------
    str
        A Markdown table; a cell is "–" when no target has a value.
    """
    head = "| | n | " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " |"
    sep = "|---|---|" + "---|" * len(SUMMARY_COLUMNS)
    lines = [head, sep]
    for row, items in summaries.items():
        cells = []
        for key, _, _ in SUMMARY_COLUMNS:
            vals = [s.get(key) for s in items]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            cells.append(_format(float(np.median(vals)) if vals else None))
        lines.append(f"| {row} | {len(items)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load_manifest(manifest) -> tuple[list[dict], str]:
    if isinstance(manifest, (str, os.PathLike)):
        path = os.fspath(manifest)
        if not os.path.exists(path):
            raise InputError(f"manifest '{path}' does not exist; check the path.")
        try:
            with open(path) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest '{path}' is not valid JSON ({exc}); "
                             "fix the file.") from exc
        base = os.path.dirname(os.path.abspath(path))
    else:
        data, base = manifest, os.getcwd()
    targets = data.get("targets") if isinstance(data, dict) else data
    if not isinstance(targets, list) or not targets:
        raise InputError("manifest lists no targets; give a JSON list (or {\"targets\": [...]}) "
                         "of objects with name, reference, top, generated and dt_ns.")
    for i, t in enumerate(targets):
        missing = [k for k in ("reference", "top", "generated", "dt_ns") if k not in t]
        if missing:
            raise InputError(f"manifest target {i} ({t.get('name', 'unnamed')}) lacks "
                             f"{', '.join(missing)}; add them to its entry.")
    return targets, base


def evaluate_many(manifest, out_dir: str, seed: int = 0, baselines: bool = True,
                  peptide_bond_nm: float = PEPTIDE_BOND_NM, echo: bool = True) -> str:
    """Evaluate many proteins and tabulate medians over targets (model, oracle, baselines).

    Parameters
    ----------
    manifest : str or list of dict
        JSON file (or its parsed content): a list, or ``{"targets": [...]}``, of objects with
        ``name``, ``reference``, ``top``, ``generated``, ``dt_ns`` and optionally ``gen_top``,
        ``replica`` (a second MD run, for the oracle row), ``replica_top``,
        ``reference_dt_ns``, ``tica_lag_ns``, and ``criteria_reference`` + ``criteria_top``: all-atom
        MD of the protein to fit the all-atom validity thresholds on when ``reference`` holds
        only backbone atoms, and ``replica_allatom`` + ``replica_allatom_top``: all-atom frames of
        the replica's run whose all-atom and combined validity stand in the oracle row when
        ``replica`` holds only backbone atoms. Relative paths are relative to the manifest.
    out_dir : str
        Folder to write: ``table.md``, ``summary.json`` and one report per target and row.
    seed : int
    baselines : bool
        Add the ANM and Gaussian-noise rows.
    peptide_bond_nm : float, nm
        Longest allowed peptide C–N bond of the all-atom checks.
    echo : bool
        Print the table.

    Returns
    -------
    str
        The Markdown table.
    """
    targets, base = _load_manifest(manifest)

    def path(p):
        return None if p is None else (p if os.path.isabs(p) else os.path.join(base, p))

    summaries: dict[str, list[dict]] = {row: [] for row in ROWS}
    per_target: dict[str, dict] = {}

    def write(folder: str) -> None:
        for i, t in enumerate(targets):
            name = str(t.get("name", f"target{i}"))
            top = path(t["top"])
            ref = load_trajectory(path(t["reference"]), top, "reference")
            gen = load_trajectory(path(t["generated"]), path(t.get("gen_top", t["top"])),
                                  "generated")
            dt = float(t["dt_ns"])
            common = dict(reference_dt_ns=t.get("reference_dt_ns"),
                          tica_lag_ns=t.get("tica_lag_ns"), seed=seed)
            labels = (t["reference"], t["generated"])
            criteria = None
            if is_all_atom(ref.topology):
                criteria = fit_allatom_criteria(ref, peptide_bond_nm=peptide_bond_nm)
            elif t.get("criteria_reference"):
                aa_ref = load_trajectory(path(t["criteria_reference"]), path(t["criteria_top"]), "criteria_reference")
                criteria = fit_allatom_criteria(aa_ref, peptide_bond_nm=peptide_bond_nm)
            rows = {"model": evaluate(ref, gen, dt, os.path.join(folder, name, "model"),
                                      labels=labels, criteria=criteria, **common)}
            if t.get("replica"):
                rep = load_trajectory(path(t["replica"]), path(t.get("replica_top", t["top"])),
                                      "replica")
                rep_dt = float(t.get("reference_dt_ns") or dt)
                rows["MD oracle"] = evaluate(
                    ref, rep, rep_dt, os.path.join(folder, name, "oracle"),
                    labels=(t["reference"], t["replica"]), criteria=criteria,
                    make_plots=False, **common)
                if t.get("replica_allatom") and criteria is not None and not is_all_atom(rep.topology):
                    # a backbone replica: its validity columns from all-atom frames of the same run
                    aa_rep = load_trajectory(path(t["replica_allatom"]), path(t["replica_allatom_top"]),
                                             "replica_allatom")
                    aa = allatom_validity(aa_rep, criteria)
                    ca = ca_validity(aa_rep, ignore_pairs=broken_pairs(ref, 0))
                    rows["MD oracle"]["summary"].update(
                        allatom_validity=float(aa.valid.mean()),
                        combined_validity=float((aa.valid & ca.valid).mean()),
                        validity_from_allatom_frames=int(aa_rep.n_frames))
            if baselines:
                ref_rmsf = rmsf(ref, ca_xyz(ref[:1])[0])
                n = gen.n_frames
                for row, make in (("ANM", anm_ensemble), ("Gaussian noise", gaussian_ensemble)):
                    traj = make(ref, ref_rmsf, n, dt_ns=dt, seed=seed)
                    rows[row] = evaluate(
                        ref, traj, dt, os.path.join(folder, name, row.split()[0].lower()),
                        labels=(t["reference"], row), make_plots=False, **common)
            per_target[name] = {row: r["summary"] for row, r in rows.items()}
            for row, r in rows.items():
                summaries[row].append(r["summary"])
        table = summary_table({k: v for k, v in summaries.items() if v})
        with open(os.path.join(folder, "table.md"), "w") as fh:
            fh.write("# STAR-MD evaluation: medians over targets\n\n" + table)
        with open(os.path.join(folder, "summary.json"), "w") as fh:
            json.dump(_clean(per_target), fh, indent=1)

    _write_atomically(out_dir, write)
    with open(os.path.join(out_dir, "table.md")) as fh:
        text = fh.read()
    if echo:
        print(text)
    return text
