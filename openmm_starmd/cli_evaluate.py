"""``starmd evaluate`` and ``starmd evaluate-many``: the evaluation library from the shell.

``starmd evaluate`` compares one generated trajectory with a reference MD trajectory and writes a
report folder (``metrics.json`` and PNG figures, see :func:`openmm_starmd.analysis.evaluate`).
``starmd evaluate-many`` runs a manifest of proteins and prints the STAR-MD-style table of
medians over targets for the model, the MD oracle and the baselines
(:func:`openmm_starmd.analysis.evaluate_many`).

Frame spacings are in ns. They are read from the files only for formats that store times
(XTC, TRR, HDF5, NetCDF); for DCD and PDB pass ``--dt-ns``. The reference spacing defaults to
the generated one. Bad input ends the command with one line naming the file, the problem and
the fix, and no report folder is written.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .analysis.inputs import InputError, infer_dt_ns, load_trajectory
from .analysis.report import evaluate, evaluate_many
from .analysis.stereochemistry import PEPTIDE_BOND_NM

__all__ = ["add_evaluate_parser", "run_evaluate", "run_evaluate_many"]


def add_evaluate_parser(subparsers) -> None:
    """Add the ``evaluate`` and ``evaluate-many`` subcommands to an argparse subparsers object.

    Each sets ``func`` (called with the parsed namespace, returns an exit status).
    """
    p = subparsers.add_parser(
        "evaluate",
        help="compare a generated trajectory with reference MD (STAR-MD metrics)",
        description="Validity, coverage and dynamics of a generated trajectory against a "
                    "reference MD trajectory; writes metrics.json and PNG plots.",
    )
    p.add_argument("--reference", required=True,
                   help="reference MD trajectory (any mdtraj format)")
    p.add_argument("--top", required=True, help="topology of the reference (PDB, ...)")
    p.add_argument("--generated", required=True, help="generated trajectory")
    p.add_argument("--gen-top", help="topology of the generated trajectory (default: --top)")
    p.add_argument("--dt-ns", type=float,
                   help="frame spacing of the generated trajectory in ns (required for DCD)")
    p.add_argument("--reference-dt-ns", type=float,
                   help="frame spacing of the reference in ns (default: read from the file, "
                        "else --dt-ns)")
    p.add_argument("--tica-lag-ns", type=float,
                   help="TICA/VAMP lag in ns (default: the coarser frame spacing)")
    p.add_argument("--energies",
                   help="text file, one potential energy per generated frame (kJ/mol)")
    p.add_argument("--reference-energies",
                   help="text file, one potential energy per reference frame (kJ/mol)")
    p.add_argument("--peptide-bond-nm", type=float, default=PEPTIDE_BOND_NM,
                   help=f"longest allowed peptide C-N bond in nm (default {PEPTIDE_BOND_NM})")
    p.add_argument("--seed", type=int, default=0, help="seed of every subsampling")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json only")
    p.add_argument("--out", required=True, help="report folder to write (replaced if present)")
    p.set_defaults(func=run_evaluate)

    q = subparsers.add_parser(
        "evaluate-many",
        help="evaluate a manifest of proteins and print the median table",
        description="Evaluate each target of a JSON manifest (model, MD oracle if a replica "
                    "is given, ANM and Gaussian-noise baselines) and write table.md.",
    )
    q.add_argument("manifest",
                   help="JSON list of {name, reference, top, generated, dt_ns, [gen_top, "
                        "replica, replica_top, reference_dt_ns, tica_lag_ns]}")
    q.add_argument("--out", required=True, help="folder to write (replaced if present)")
    q.add_argument("--no-baselines", action="store_true", help="skip the ANM and noise rows")
    q.add_argument("--peptide-bond-nm", type=float, default=PEPTIDE_BOND_NM,
                   help=f"longest allowed peptide C-N bond in nm (default {PEPTIDE_BOND_NM})")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=run_evaluate_many)


def _energies(path: str | None, n_frames: int, label: str):
    if path is None:
        return None
    try:
        e = np.atleast_1d(np.loadtxt(path, dtype=np.float64))
    except (OSError, ValueError) as exc:
        raise InputError(f"{label} energies '{path}' could not be read ({exc}); pass a text "
                         "file with one number (kJ/mol) per line.") from exc
    if len(e) != n_frames:
        raise InputError(f"{label} energies '{path}' have {len(e)} values for {n_frames} "
                         "frames; pass one energy per frame.")
    return e


def _fail(command: str, exc: Exception) -> int:
    print(f"starmd {command}: error: {exc}", file=sys.stderr)
    return 2


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``starmd evaluate`` from parsed arguments; returns the exit status."""
    try:
        ref = load_trajectory(args.reference, args.top, "reference")
        gen = load_trajectory(args.generated, args.gen_top or args.top, "generated")
        dt = args.dt_ns if args.dt_ns is not None else infer_dt_ns(gen, args.generated)
        if dt is None:
            raise InputError(f"the frame spacing of generated '{args.generated}' is not stored "
                             "in the file; pass --dt-ns.")
        ref_dt = args.reference_dt_ns
        if ref_dt is None:
            ref_dt = infer_dt_ns(ref, args.reference) or dt
        energies = _energies(args.energies, gen.n_frames, "generated")
        ref_energies = _energies(args.reference_energies, ref.n_frames, "reference")
        result = evaluate(
            ref, gen, dt, args.out, reference_dt_ns=ref_dt, tica_lag_ns=args.tica_lag_ns,
            energies=energies, reference_energies=ref_energies,
            labels=(f"reference '{args.reference}'", f"generated '{args.generated}'"),
            peptide_bond_nm=args.peptide_bond_nm, seed=args.seed,
            make_plots=not args.no_plots,
        )
    except InputError as exc:
        return _fail("evaluate", exc)
    width = max(len(k) for k in result["summary"])
    for key, value in result["summary"].items():
        shown = "n/a" if value is None else f"{value:.4f}"
        print(f"{key:<{width}}  {shown}")
    print(f"report written to {args.out}")
    return 0


def run_evaluate_many(args: argparse.Namespace) -> int:
    """Run ``starmd evaluate-many`` from parsed arguments; returns the exit status."""
    try:
        evaluate_many(args.manifest, args.out, seed=args.seed, baselines=not args.no_baselines,
                      peptide_bond_nm=args.peptide_bond_nm, echo=True)
    except InputError as exc:
        return _fail("evaluate-many", exc)
    print(f"table written to {args.out}/table.md")
    return 0
