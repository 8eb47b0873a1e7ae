"""Benchmark 3, the fidelity table: STAR-MD's metrics on the test proteins, per model and per Δt.

For every model file (``--model NAME=PATH``, repeatable: the default model and its ablations) and
every Δt (``--dt-ns``, default 1 ns and "finest", the reference frame spacing), this script

1. generates one all-atom trajectory per test protein with ``starmd run``'s own code
   (:func:`openmm_starmd.cli.run_one`: PDBFixer preparation, :class:`StarMDIntegrator` in a plain
   OpenMM ``Simulation``, ``DCDReporter`` every frame, vacuum backmapping), starting from the
   **first frame of the reference MD** (replica 0's ``traj.dcd`` frame 0, written as a PDB; the
   preparation strips and rebuilds its hydrogens, heavy atoms stay where the MD had them), long
   enough to span the reference (``ceil(span / Δt)`` frames, at least ``--min-frames``);
2. writes an evaluate-many manifest (reference = replica 0, oracle = replica 1 when complete) and
   runs :func:`openmm_starmd.analysis.evaluate_many`, which adds the ANM and Gaussian-noise rows;
3. prints one Markdown table of medians over proteins (rows: each model, MD oracle, ANM,
   Gaussian noise; one block per Δt) and writes it to ``OUT/fidelity.md``.

Choices made where the issue is silent:

- A Δt is *supported* by a reference when the library's own check passes: the reference holds
  the TICA lag (= max(Δt, reference spacing)) plus 3 frames (``analysis.inputs.lag_frames``).
  A 1 ns reference saved every 10 ps has 100 frames and cannot support Δt = 1 ns (it needs 103);
  such cells are listed as skipped with that reason, never filled in.
- The TICA/VAMP lag is set to max(Δt, reference spacing) for every row, so the MD oracle (the
  full second replica, at the reference spacing) is judged at the same lag as the model.
- The oracle and baseline rows do not depend on the model (same reference, frame count and
  seed); they are taken from the first model's evaluation at each Δt.
- Only complete MD runs (a ``done`` file) are used; a protein without a complete replica 0 is
  skipped with the reason, one without a complete replica 1 gets no oracle.

Output layout (``OUT`` = ``--out``)::

    OUT/starts/<protein>.pdb                      frame 0 of the reference, the start structure
    OUT/<model>/dt<Δt>/gen/<protein>/             starmd run output (traj.dcd, prepared.pdb, ...)
    OUT/<model>/dt<Δt>/manifest.json              the evaluate-many manifest
    OUT/<model>/dt<Δt>/report/                    evaluate-many output (table.md, summary.json, ...)
    OUT/fidelity.md                               the combined table

Examples::

    python benchmarks/fidelity_table.py                                   # bundled model, all test proteins
    python benchmarks/fidelity_table.py --model default=openmm_starmd/data/starmd_default.pt \\
        --model no_rope=runs/ablation_rope/model.pt --dt-ns 1.0 finest
    python benchmarks/fidelity_table.py --proteins 2M9I --dt-ns finest --max-frames 20   # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "training" / "plan.json"
MD_ROOT = REPO / "training" / "md"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "fidelity"

#: Summary keys (see openmm_starmd.analysis.report.SUMMARY_COLUMNS) shown by default.
MAIN_COLUMNS = (
    "combined_validity", "ca_validity", "rmsf_pearson_r", "pca_jsd", "pca_recall", "pca_w2_nm",
    "pairwise_rmsd_nm", "tic0_jsd", "tic0_acf_pearson_r", "rmsd_vs_lag_deviation_nm",
    "vamp2_deviation",
)
BASE_ROWS = ("MD oracle", "ANM", "Gaussian noise")


# --- inputs -------------------------------------------------------------------------------

@dataclass
class MDRun:
    """One complete all-atom MD replica under training/md/<protein>/r<k>/.

    Attributes
    ----------
    folder : Path
    traj, top : Path
        ``traj.dcd`` and its topology ``topology.pdb``.
    n_frames : int
        Frames in the DCD.
    frame_ns : float, ns
        Frame spacing (``settings.frame_ps`` of record.json).
    """

    folder: Path
    traj: Path
    top: Path
    n_frames: int
    frame_ns: float

    @property
    def span_ns(self) -> float:
        """Time from the first to the last frame, ns."""
        return (self.n_frames - 1) * self.frame_ns


@dataclass
class Target:
    """A test protein: its reference MD, optional second replica and remarks for the table."""

    name: str
    reference: MDRun
    replica: MDRun | None
    notes: list = field(default_factory=list)


def load_md_run(folder: Path) -> tuple[MDRun | None, str | None]:
    """A complete MD replica, or (None, reason) if the folder is missing or unfinished.

    Parameters
    ----------
    folder : Path
        ``training/md/<protein>/r<k>``.

    Returns
    -------
    (MDRun or None, str or None)
    """
    from mdtraj.formats import DCDTrajectoryFile

    if not folder.is_dir():
        return None, f"{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder} does not exist"
    rel = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    if not (folder / "done").exists():
        return None, f"{rel} is not finished (no `done` file)"
    traj, top = folder / "traj.dcd", folder / "topology.pdb"
    for f in (traj, top, folder / "record.json"):
        if not f.exists():
            return None, f"{rel} lacks {f.name}"
    record = json.loads((folder / "record.json").read_text())
    frame_ps = record.get("settings", {}).get("frame_ps")
    if not frame_ps:
        return None, f"{rel}/record.json gives no settings.frame_ps"
    with DCDTrajectoryFile(str(traj)) as fh:
        n_frames = len(fh)
    return MDRun(folder, traj, top, int(n_frames), float(frame_ps) / 1000.0), None


def find_targets(names: list[str], md_root: Path) -> tuple[list[Target], dict[str, str]]:
    """Targets with a complete replica 0, and {protein: reason} for those skipped."""
    targets, skipped = [], {}
    for name in names:
        ref, why = load_md_run(md_root / name / "r0")
        if ref is None:
            skipped[name] = f"no reference MD: {why}"
            continue
        rep, why_rep = load_md_run(md_root / name / "r1")
        t = Target(name, ref, None)
        if rep is None:
            t.notes.append(f"no MD oracle: {why_rep}")
        elif not math.isclose(rep.frame_ns, ref.frame_ns):
            t.notes.append(f"no MD oracle: replica 1 is saved every {rep.frame_ns:g} ns, "
                           f"replica 0 every {ref.frame_ns:g} ns")
        else:
            t.replica = rep
        targets.append(t)
    return targets, skipped


def test_proteins(plan: Path) -> list[str]:
    """Names of the proteins with split "test" in training/plan.json."""
    proteins = json.loads(plan.read_text())["proteins"]
    return [name for name, p in proteins.items() if p.get("split") == "test"]


def resolve_dts(specs: list[str], targets: list[Target]) -> list[tuple[str, float]]:
    """(label, Δt in ns) for each ``--dt-ns`` entry; "finest" is the coarsest reference spacing
    among the targets (the finest Δt that every reference supports)."""
    out = []
    for s in specs:
        if s == "finest":
            if not targets:
                raise SystemExit("--dt-ns finest needs at least one protein with reference MD.")
            dt = max(t.reference.frame_ns for t in targets)
            out.append((f"finest ({dt:g} ns)", dt))
        else:
            try:
                dt = float(s)
            except ValueError:
                raise SystemExit(f"--dt-ns {s!r} is neither a number of ns nor 'finest'; "
                                 "write e.g. --dt-ns 1.0 finest.") from None
            if dt <= 0:
                raise SystemExit(f"--dt-ns {s} must be positive.")
            out.append((f"{dt:g} ns", dt))
    return out


def unsupported(run: MDRun, dt_ns: float, what: str) -> str | None:
    """Why ``run`` cannot support a Δt (None if it can), by the evaluation's own lag check."""
    from openmm_starmd.analysis.inputs import InputError, lag_frames

    lag_ns = max(dt_ns, run.frame_ns)
    try:
        lag_frames(lag_ns, run.frame_ns, run.n_frames, what, "TICA lag")
    except InputError:
        k = int(round(lag_ns / run.frame_ns))
        return (f"{what} spans {run.span_ns:g} ns ({run.n_frames} frames every {run.frame_ns:g} ns); "
                f"a TICA lag of Δt = {dt_ns:g} ns needs at least {k + 3} frames")
    return None


def n_generated(span_ns: float, dt_ns: float, min_frames: int, max_frames: int | None) -> tuple[int, bool]:
    """Frames to generate: enough to span the reference, at least ``min_frames``, at most
    ``max_frames``. Returns (frames, truncated)."""
    n = max(min_frames, int(math.ceil(span_ns / dt_ns - 1e-9)))
    if max_frames is not None and n > max_frames:
        return max_frames, True
    return n, False


# --- generation and evaluation ------------------------------------------------------------

def write_start(target: Target, path: Path) -> Path:
    """Write frame 0 of the reference MD as a PDB (the topology's names, positions from the DCD)."""
    import mdtraj as md
    from openmm import app, unit

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = target.reference
    pdb = app.PDBFile(str(ref.top))
    xyz_nm = md.load_frame(str(ref.traj), 0, top=str(ref.top)).xyz[0]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        app.PDBFile.writeFile(pdb.topology, xyz_nm.astype(float) * unit.nanometer, fh, keepIds=True)
    os.replace(tmp, path)
    return path


def generate(start_pdb: Path, out: Path, model_path: str, dt_ns: float, n_frames: int, seed: int,
             device: str, steps: int | None, regenerate: bool, ca_geometry: bool = True) -> tuple[dict, bool]:
    """One all-atom trajectory with ``starmd run``'s machinery (all-atom frame every Δt).

    Reuses ``out`` if its run.json matches (model, Δt, frames, seed, steps, Cα projection; records
    from before the projection existed count as without it) unless ``regenerate``.
    Returns (the run record, whether it was reused).
    """
    from openmm_starmd.cli import run_one

    record_path = out / "run.json"
    if record_path.exists() and not regenerate:
        rec = json.loads(record_path.read_text())
        same = (rec.get("model") == str(model_path) and math.isclose(rec.get("dt_ns", -1), dt_ns)
                and rec.get("frames") == n_frames and rec.get("seed") == seed
                and rec.get("all_atom_frames") == n_frames and rec.get("steps_override") == steps
                and rec.get("ca_geometry", False) == ca_geometry and (out / "traj.dcd").exists())
        if same:
            return rec, True
    rec = run_one(str(start_pdb), str(out), time_ns=n_frames * dt_ns, dt_ns=dt_ns, report_ns=dt_ns,
                  model=str(model_path), device=device, seed=seed, steps=steps, progress=True,
                  ca_geometry=ca_geometry)
    rec["steps_override"] = steps
    record_path.write_text(json.dumps(rec, indent=1, default=str))
    return rec, False


def manifest_entry(target: Target, gen_dir: Path, dt_ns: float, base: Path, with_oracle: bool) -> dict:
    """One evaluate-many target (paths relative to the manifest folder ``base``)."""
    rel = lambda p: os.path.relpath(p, base)  # noqa: E731
    ref = target.reference
    entry = {
        "name": target.name,
        "reference": rel(ref.traj), "top": rel(ref.top),
        "generated": rel(gen_dir / "traj.dcd"), "gen_top": rel(gen_dir / "prepared.pdb"),
        "dt_ns": dt_ns, "reference_dt_ns": ref.frame_ns,
        "tica_lag_ns": max(dt_ns, ref.frame_ns),
    }
    if with_oracle and target.replica is not None:
        entry["replica"] = rel(target.replica.traj)
        entry["replica_top"] = rel(target.replica.top)
    return entry


@dataclass
class Cell:
    """What one (model, Δt) produced: per-row lists of per-protein summaries, and remarks."""

    summaries: dict = field(default_factory=dict)  # row -> list of summary dicts
    notes: list = field(default_factory=list)
    report: Path | None = None


def run_cell(model: str, model_path: str, dt_label: str, dt_ns: float, targets: list[Target],
             args, bar) -> Cell:
    """Generate and evaluate every supported target for one model at one Δt."""
    from openmm_starmd.analysis import evaluate_many

    cell = Cell()
    root = Path(args.out) / model / f"dt{dt_ns:g}ns"
    entries = []
    for i, t in enumerate(targets):
        bar.set_description(f"{model} Δt={dt_ns:g} ns {t.name}")
        why = unsupported(t.reference, dt_ns, f"{t.name} replica 0")
        if why:
            cell.notes.append(f"{t.name}: skipped, {why}")
            bar.update(1)
            continue
        with_oracle = t.replica is not None
        if with_oracle:
            why_rep = unsupported(t.replica, dt_ns, f"{t.name} replica 1")
            if why_rep:
                cell.notes.append(f"{t.name}: no MD oracle, {why_rep}")
                with_oracle = False
        cell.notes.extend(f"{t.name}: {n}" for n in t.notes)
        n, truncated = n_generated(t.reference.span_ns, dt_ns, args.min_frames, args.max_frames)
        if truncated:
            cell.notes.append(f"{t.name}: generation capped at {n} frames by --max-frames "
                              f"({n * dt_ns:g} ns of the reference's {t.reference.span_ns:g} ns)")
        start = write_start(t, Path(args.out) / "starts" / f"{t.name}.pdb")
        gen_dir = root / "gen" / t.name
        rec, reused = generate(start, gen_dir, model_path, dt_ns, n, args.seed + i, args.device,
                               args.steps, args.regenerate, args.ca_geometry)
        cell.notes.append(f"{t.name}: {n} frames × {dt_ns:g} ns generated in {rec['wall_s']:.0f} s "
                          f"on {rec['device']}{' (an earlier run, reused)' if reused else ''} "
                          f"(reference: {t.reference.n_frames} frames every {t.reference.frame_ns:g} ns)")
        entries.append(manifest_entry(t, gen_dir, dt_ns, root, with_oracle))
        bar.update(1)
    if not entries:
        cell.notes.append(f"Δt = {dt_label}: no protein supports it; nothing evaluated")
        return cell
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"targets": entries}, indent=1))
    bar.set_description(f"{model} Δt={dt_ns:g} ns evaluate-many")
    cell.report = root / "report"
    evaluate_many(str(manifest), str(cell.report), seed=args.seed, baselines=True, echo=False)
    per_target = json.loads((cell.report / "summary.json").read_text())
    for name, rows in per_target.items():
        for row, summary in rows.items():
            cell.summaries.setdefault(row, []).append(summary)
        cell.notes.append(f"{name}: valid frames (only these enter coverage and dynamics): "
                          + ", ".join(valid_counts(cell.report / name)))
    return cell


def valid_counts(folder: Path) -> list[str]:
    """'row valid/total' for each evaluate-many row report of one protein."""
    out = []
    for sub, row in (("model", "model"), ("oracle", "MD oracle"), ("anm", "ANM"),
                     ("gaussian", "Gaussian noise")):
        path = folder / sub / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            out.append(f"{row} {m['validity']['n_valid_frames']}/{m['inputs']['n_generated_frames']}")
    return out


# --- the table ----------------------------------------------------------------------------

def _median(items: list[dict], key: str) -> float | None:
    vals = [s.get(key) for s in items]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def combined_table(cells: dict, models: list[str], dts: list[tuple[str, float]],
                   columns: list[str]) -> str:
    """Markdown: one block of rows per Δt (models, then MD oracle, ANM, Gaussian noise),
    cells = medians over proteins (as in evaluate-many); "–" where no protein has a value."""
    from openmm_starmd.analysis.report import SUMMARY_COLUMNS

    headers = {k: h for k, h, _ in SUMMARY_COLUMNS}
    lines = ["| Δt | row | n | " + " | ".join(headers[k] for k in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for label, _ in dts:
        first = cells[(models[0], label)]
        rows = [(m, cells[(m, label)].summaries.get("model", [])) for m in models]
        rows += [(r, first.summaries.get(r, [])) for r in BASE_ROWS]
        if not any(items for _, items in rows):
            lines.append(f"| {label} | all | 0 | " + " | ".join(["skipped"] * len(columns)) + " |")
            continue
        for name, items in rows:
            if not items:
                lines.append(f"| {label} | {name} | 0 | " + " | ".join(["–"] * len(columns)) + " |")
                continue
            cells_txt = [_fmt(_median(items, k)) for k in columns]
            lines.append(f"| {label} | {name} | {len(items)} | " + " | ".join(cells_txt) + " |")
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def render(cells, models, model_paths, dts, columns, skipped, command) -> str:
    """The full fidelity.md: table, then inputs and every skip/remark per model and Δt."""
    out = ["# Fidelity table (benchmark 3)", "", f"`{command}`", "",
           combined_table(cells, models, dts, columns),
           "Medians over proteins; n = proteins evaluated. Oracle and baseline rows come from "
           f"the evaluation of `{models[0]}` (they do not depend on the model).", "",
           "Models: " + ", ".join(f"`{m}` = `{model_paths[m]}`" for m in models), ""]
    if skipped:
        out += ["Proteins skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    for m in models:
        for label, _ in dts:
            c = cells[(m, label)]
            out.append(f"Notes, `{m}` at Δt = {label}"
                       + (f" (report: `{_shown(c.report)}`)" if c.report else "") + ":")
            out += [f"- {n}" for n in c.notes] + [""]
    return "\n".join(out)


# --- command line -------------------------------------------------------------------------

def parse_model(text: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' (name = file stem) -> (name, path); the path must exist."""
    name, _, path = text.partition("=") if "=" in text else (Path(text).stem, "", text)
    if not path or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--model {text!r}: model file {path!r} not found; "
                                         "pass NAME=PATH to a checkpoint from training/export.py.")
    if not name or "/" in name:
        raise argparse.ArgumentTypeError(f"--model {text!r}: give a plain NAME (used as a folder name).")
    return name, str(Path(path).resolve())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", type=parse_model, metavar="NAME=PATH",
                   help="model to evaluate, repeatable (ablations are more entries); "
                        "default: default=<bundled openmm_starmd/data/starmd_default.pt>")
    p.add_argument("--proteins", nargs="+", default=None,
                   help="protein names under --md-root (default: split 'test' in training/plan.json)")
    p.add_argument("--dt-ns", nargs="+", default=["1.0", "finest"],
                   help="Δt values in ns, or 'finest' = the reference frame spacing (default: 1.0 finest)")
    p.add_argument("--min-frames", type=int, default=20,
                   help="fewest frames generated per protein and Δt (default 20, at least 4)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="cap on generated frames (for smoke runs; capped cells are marked in the notes)")
    p.add_argument("--md-root", default=str(MD_ROOT),
                   help="folder of reference MD, <protein>/r0 and r1 (default training/md)")
    p.add_argument("--plan", default=str(PLAN), help="plan listing the test split (default training/plan.json)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/out/fidelity)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of protein i's generation is seed + i; also the evaluation seed (default 0)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda (default auto)")
    p.add_argument("--steps", type=int, default=None,
                   help="reverse diffusion steps per frame (default: each model's own)")
    p.add_argument("--ca-geometry", action=argparse.BooleanOptionalAction, default=True,
                   help="generate as StarMDIntegrator does by default, with each frame's Cα chain links and "
                        "contacts held where MD keeps them; --no-ca-geometry scores the network's own frames")
    p.add_argument("--all-columns", action="store_true",
                   help="show every summary metric of evaluate-many, not only the main ones")
    p.add_argument("--regenerate", action="store_true",
                   help="generate again even where a matching run.json exists (default: reuse)")
    return p


def main(argv=None) -> int:
    import shlex
    import sys

    from tqdm.auto import tqdm

    from openmm_starmd.analysis.report import SUMMARY_COLUMNS
    from openmm_starmd.checkpoints import bundled_model_path

    args = build_parser().parse_args(argv)
    if args.min_frames < 4:
        raise SystemExit(f"--min-frames {args.min_frames} is too few; the TICA lag check needs 4.")
    if args.max_frames is not None and args.max_frames < args.min_frames:
        raise SystemExit(f"--max-frames {args.max_frames} is below --min-frames {args.min_frames}.")
    models = args.model or [("default", str(bundled_model_path("default")))]
    if len({m for m, _ in models}) != len(models):
        raise SystemExit("two --model entries share a NAME; give each a different one.")
    model_paths = dict(models)
    names = args.proteins or test_proteins(Path(args.plan))
    targets, skipped = find_targets(names, Path(args.md_root))
    dts = resolve_dts(args.dt_ns, targets)
    columns = [k for k, _, _ in SUMMARY_COLUMNS] if args.all_columns else list(MAIN_COLUMNS)

    cells = {}
    start = time.perf_counter()
    with tqdm(total=len(models) * len(dts) * len(targets), unit="protein", position=0) as bar:
        for model, path in models:
            for label, dt in dts:
                cells[(model, label)] = run_cell(model, path, label, dt, targets, args, bar)
    command = "python benchmarks/fidelity_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = render(cells, [m for m, _ in models], model_paths, dts, columns, skipped, command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text(text)
    print(text)
    print(f"wrote {out / 'fidelity.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
