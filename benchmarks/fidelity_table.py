"""Benchmark 3, the fidelity table: STAR-MD's metrics on the test proteins, per model and per Δt.

For every model file (``--model NAME=PATH``, repeatable: the default model and its ablations) and
every Δt (``--dt-ns``, default 1 ns and "finest", the reference frame spacing), this script

1. generates one all-atom trajectory per test protein with ``starmd run``'s own code
   (:func:`openmm_starmd.cli.run_one`: PDBFixer preparation, :class:`StarMDIntegrator` in a plain
   OpenMM ``Simulation``, ``DCDReporter`` every frame, vacuum backmapping), starting from the
   **first frame of the reference MD** (its backbone from replica 0's training shard; side chains
   of the prepared structure superposed per residue and minimised with that backbone held), long
   enough to span the reference (``ceil(span / Δt)`` frames, at least ``--min-frames``);
2. writes an evaluate-many manifest (reference = replica 0, oracle = replica 1 when complete, both
   the backbone trajectories of the manifest's shards, every frame) and runs
   :func:`openmm_starmd.analysis.evaluate_many`, which adds the ANM and Gaussian-noise rows; the
   all-atom validity thresholds are fitted on replica 0's all-atom frames on this machine
   (``--md-root``; after a restore on a fresh clone, the frames since then, or the sample
   committed with the state), and the oracle row's all-atom and combined validity come from
   replica 1's all-atom frames found the same way (its other columns from its shard);
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
- Only complete MD runs (marked complete in the manifest) are used; a protein without a complete
  replica 0 is skipped with the reason, one without a complete replica 1 gets no oracle.
- References come from the shards, not the all-atom run directories: on a fresh clone those hold
  only what was simulated since the restore (training/restore_md.py), the shards everything.

Output layout (``OUT`` = ``--out``)::

    OUT/starts/<protein>.pdb                      frame 0 of the reference, the start structure
    OUT/references/<protein>_r<k>.{dcd,pdb}       reference backbone trajectories (from the shards)
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
MANIFEST = REPO / "training" / "data" / "manifest.json"
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
    """One reference MD replica, as a backbone trajectory written from its training shard.

    Attributes
    ----------
    folder : Path
        Where the files below were written (``OUT/references``).
    traj, top : Path
        Backbone DCD (N, CA, C, O) and its PDB topology, every frame of the shard.
    n_frames : int
    frame_ns : float, ns
    shard : BackboneShard
    allatom : (Path, Path) or None
        All-atom frames of the same run found on this machine (DCD, PDB), for the all-atom
        validity thresholds; None when there are none.
    """

    folder: Path
    traj: Path
    top: Path
    n_frames: int
    frame_ns: float
    shard: object = None
    allatom: tuple | None = None

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


def _manifest_entries(manifest: Path) -> dict:
    entries = json.loads(manifest.read_text())["shards"]
    return {(e["protein"], int(e["replica"])): e for e in entries}


def allatom_frames(run_dir: Path, out: Path) -> tuple | None:
    """All-atom MD of ``run_dir`` on this machine (``restore_md.allatom_md``: the run's own
    checkpointed frames, or the sample committed with its MD state) copied to ``out`` (.dcd +
    .pdb); None when there is none."""
    import sys

    import mdtraj as md

    sys.path.insert(0, str(REPO / "training"))
    import restore_md  # noqa: E402

    found = restore_md.allatom_md(str(run_dir))
    if found is None:
        return None
    dcd, top, n, _ = found
    with md.open(dcd) as fh:
        traj = fh.read_as_traj(md.load_topology(top), n_frames=n)
    out.parent.mkdir(parents=True, exist_ok=True)
    traj.save_dcd(str(out.with_suffix(".dcd")))
    traj[0].save_pdb(str(out.with_suffix(".pdb")))
    return out.with_suffix(".dcd"), out.with_suffix(".pdb")


def load_md_run(entry: dict | None, manifest: Path, out: Path, md_root: Path | None = None
                ) -> tuple[MDRun | None, str | None]:
    """A complete reference replica from its manifest entry, or (None, reason).

    The shard's backbone (every frame, also those from before a restore) is written to
    ``out/<protein>_r<k>.{dcd,pdb}``; all-atom frames of the run on this machine, if any, go
    next to it (``_allatom``) for the all-atom validity thresholds."""
    from openmm_starmd.data import backbone_trajectory, load_shard

    if entry is None:
        return None, "not in the manifest"
    key = f"{entry['protein']}/r{entry['replica']}"
    if not entry.get("complete"):
        return None, f"{key} is not finished (the manifest marks it incomplete)"
    shard = load_shard(str(manifest.parent / entry["file"]), entry.get("sha256"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{entry['protein']}_r{entry['replica']}"
    traj = backbone_trajectory(shard)
    traj.save_dcd(str(stem) + ".dcd")
    traj[0].save_pdb(str(stem) + ".pdb")
    allatom = None
    if md_root is not None:
        allatom = allatom_frames(md_root / entry["protein"] / f"r{entry['replica']}",
                                 Path(str(stem) + "_allatom"))
    return MDRun(out, Path(str(stem) + ".dcd"), Path(str(stem) + ".pdb"), shard.n_frames,
                 float(shard.frame_spacing_ns), shard, allatom), None


def find_targets(names: list[str], manifest: Path, out: Path, md_root: Path | None = None
                 ) -> tuple[list[Target], dict[str, str]]:
    """Targets with a complete replica 0 in the manifest, and {protein: reason} for those skipped."""
    entries = _manifest_entries(manifest)
    targets, skipped = [], {}
    for name in names:
        ref, why = load_md_run(entries.get((name, 0)), manifest, out, md_root)
        if ref is None:
            skipped[name] = f"no reference MD: {why}"
            continue
        rep, why_rep = load_md_run(entries.get((name, 1)), manifest, out, md_root)
        t = Target(name, ref, None)
        if rep is None:
            t.notes.append(f"no MD oracle: {why_rep}")
        elif not math.isclose(rep.frame_ns, ref.frame_ns):
            t.notes.append(f"no MD oracle: replica 1 is saved every {rep.frame_ns:g} ns, "
                           f"replica 0 every {ref.frame_ns:g} ns")
        else:
            t.replica = rep
        if ref.allatom is None:
            t.notes.append("no all-atom MD of replica 0 on this machine: validity is Cα only")
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

def write_start(target: Target, path: Path, plan: Path = PLAN) -> Path:
    """Write the start structure: the protein's prepared structure (training/plan.json) with every
    residue superposed on frame 0 of the reference backbone (N, CA, C, O), then minimised in
    vacuum with that backbone restrained (5e4 kJ/mol/nm²). The shards keep only the backbone, so
    the side chains are the prepared structure's, placed on the MD's frame 0; ``starmd run``'s
    preparation then rebuilds the hydrogens."""
    import sys

    import openmm
    from openmm import app, unit

    from openmm_starmd.prepare import prepare_protein

    if path.exists():
        return path
    sys.path.insert(0, str(REPO / "training"))
    import restore_md  # noqa: E402

    prot = json.loads(plan.read_text())["proteins"][target.name]
    prepared = prepare_protein(str(plan.parent / prot["file"]),
                               replace_nonstandard=bool(prot.get("prepare_options", {}).get("replace_nonstandard")))
    pos = np.asarray(prepared.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    shard = target.reference.shard
    idx4, residue_atoms = restore_md.backbone_indices(prepared.topology, shard)
    frame0 = shard.coords_nm[0].astype(np.float64)
    have = idx4 >= 0
    new = pos.copy()
    for i, atoms in enumerate(residue_atoms):
        if have[i].sum() >= 3:
            new[atoms] = restore_md._kabsch_apply(pos[idx4[i, have[i]]], frame0[i, have[i]], pos[atoms])
    new[idx4[have]] = frame0[have]
    system = app.ForceField("amber14-all.xml").createSystem(prepared.topology, nonbondedMethod=app.NoCutoff)
    force = openmm.CustomExternalForce("0.5*k_start*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    force.addGlobalParameter("k_start", 5.0e4)
    for name in ("x0", "y0", "z0"):
        force.addPerParticleParameter(name)
    for atom, xyz in zip(idx4[have], frame0[have]):
        force.addParticle(int(atom), [float(v) for v in xyz])
    system.addForce(force)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": "1"})
    ctx.setPositions(new)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 1000)
    xyz = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        app.PDBFile.writeFile(prepared.topology, xyz * unit.nanometer, fh, keepIds=True)
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
        if target.replica.allatom is not None:
            entry["replica_allatom"], entry["replica_allatom_top"] = (rel(target.replica.allatom[0]),
                                                                       rel(target.replica.allatom[1]))
    if ref.allatom is not None:
        entry["criteria_reference"], entry["criteria_top"] = rel(ref.allatom[0]), rel(ref.allatom[1])
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
        start = write_start(t, Path(args.out) / "starts" / f"{t.name}.pdb", Path(args.plan))
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
    p.add_argument("--manifest", default=str(MANIFEST),
                   help="training data manifest: replica 0 of each protein is the reference, replica 1 the "
                        "oracle (default training/data/manifest.json)")
    p.add_argument("--md-root", default=str(MD_ROOT),
                   help="all-atom MD on this machine, <protein>/r0, for the all-atom validity thresholds "
                        "(default training/md)")
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
    targets, skipped = find_targets(names, Path(args.manifest), Path(args.out) / "references", Path(args.md_root))
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
