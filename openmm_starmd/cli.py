"""The ``starmd`` command: generate (``run``, ``run-many``) and evaluate (``evaluate``, ``evaluate-many``).

``starmd run input.pdb --time 1us --dt 1ns --report-every 10ns -o out/`` prepares the protein with
PDBFixer, drives :class:`~openmm_starmd.integrator.StarMDIntegrator` inside a plain OpenMM
``Simulation`` and writes, into ``out/``:

* ``prepared.pdb``: the structure the trajectory starts from (what PDBFixer made of the input);
* ``traj.dcd``: all-atom frames every ``--report-every`` (backmapped, see backmap.py);
* ``traj_ca.dcd`` with ``ca.pdb``: the Cα trace of *every* generated frame (frame origins, no
  backmapping needed, so this costs nothing);
* ``log.csv``: OpenMM's StateDataReporter (step, time in ps, potential energy, speed);
* ``run.json``: every setting, the model and the seed.

Outputs are written under temporary names and renamed at the end, so a failed run leaves no file
that looks complete. ``run-many`` walks a CSV of inputs; under ``torchrun`` each rank takes every
WORLD_SIZE-th row on its own device and skips rows whose ``run.json`` exists, so it resumes per protein.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

__all__ = ["main", "parse_time_ns"]

_UNITS_NS = {"fs": 1e-6, "ps": 1e-3, "ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6}


def parse_time_ns(text: str, name: str) -> float:
    """'1us', '10 ns', '500ps' -> ns. A bare number is refused: the unit must be explicit."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zµ]+)\s*", str(text))
    if not m or m.group(2) not in _UNITS_NS:
        raise argparse.ArgumentTypeError(
            f"{name}={text!r} is not a time with a unit; write e.g. 1us, 10ns or 500ps."
        )
    return float(m.group(1)) * _UNITS_NS[m.group(2)]


def _frames_of(total_ns: float, dt_ns: float, name: str) -> int:
    n = total_ns / dt_ns
    if n < 1 or abs(n - round(n)) > 1e-6 * max(1.0, n):
        raise ValueError(f"{name} ({total_ns:g} ns) is not a whole number (>= 1) of --dt ({dt_ns:g} ns); "
                         "choose times that are multiples of dt.")
    return int(round(n))


def _ca_topology(topology):
    """A Cα-only copy of an OpenMM Topology (same chains, residues, names)."""
    from openmm import app

    top = app.Topology()
    for chain in topology.chains():
        c = top.addChain(chain.id)
        for res in chain.residues():
            ca = [a for a in res.atoms() if a.name == "CA"]
            if ca:
                r = top.addResidue(res.name, c, res.id)
                top.addAtom("CA", app.element.carbon, r)
    return top


def _start_run(pdb_path, out_dir, time_ns, dt_ns, report_ns, forcefield, seed):
    """Shared set-up of run_one and run_replicas: frame counts, a fresh out_dir/.partial, the prepared
    structure written there with its Cα-only copy ca.pdb, the System, and a seed."""
    import numpy as np
    from openmm import app, unit

    from .prepare import prepare_protein

    n_frames = _frames_of(time_ns, dt_ns, "--time")
    every = _frames_of(report_ns, dt_ns, "--report-every")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    prepared = prepare_protein(pdb_path)
    prepared.write_pdb(tmp / "prepared.pdb")
    system = app.ForceField(*forcefield).createSystem(prepared.topology)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
    ca_top = _ca_topology(prepared.topology)
    ca_idx = [a.index for a in prepared.topology.atoms() if a.name == "CA"]
    with open(tmp / "ca.pdb", "w") as fh:
        start_nm = np.asarray(prepared.positions.value_in_unit(unit.nanometer))
        app.PDBFile.writeFile(ca_top, start_nm[ca_idx] * unit.nanometer, fh)
    return n_frames, every, out, tmp, prepared, system, seed, ca_top


def _finish_run(out: Path, tmp: Path, record: dict) -> dict:
    """Move everything from .partial into out_dir; run.json last, since its presence marks a finished run."""
    (tmp / "run.json").write_text(json.dumps(record, indent=1, default=str))
    for f in tmp.iterdir():
        if f.name != "run.json":
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
    os.replace(tmp / "run.json", out / "run.json")
    tmp.rmdir()
    return record


def run_one(pdb_path, out_dir, time_ns: float, dt_ns: float, report_ns: float, *, model=None, device="auto",
            seed=None, steps=None, backmap="vacuum", forcefield=("amber14-all.xml", "implicit/gbn2.xml"),
            progress=True, ca_geometry=True) -> dict:
    """Generate one trajectory; returns the run record (also written to out_dir/run.json)."""
    from openmm import app, unit
    from tqdm.auto import tqdm

    from .backmap import VACUUM_DIELECTRIC
    from .integrator import StarMDIntegrator

    n_frames, every, out, tmp, prepared, system, seed, ca_top = _start_run(
        pdb_path, out_dir, time_ns, dt_ns, report_ns, forcefield, seed)
    integrator = StarMDIntegrator(dt=dt_ns * unit.nanoseconds, model=model, device=device, seed=seed,
                                  diffusion_steps=steps, backmap=backmap, keep_ca_geometry=ca_geometry)
    sim = app.Simulation(prepared.topology, system, integrator)
    sim.context.setPositions(prepared.positions)

    ca_handle = open(tmp / "traj_ca.dcd", "wb")
    ca_dcd = app.DCDFile(ca_handle, ca_top, dt_ns * unit.nanoseconds, firstStep=1, interval=1)
    log_handle = open(tmp / "log.csv", "w")
    sim.reporters += [
        app.DCDReporter(str(tmp / "traj.dcd"), every),
        app.StateDataReporter(log_handle, every, step=True, time=True, potentialEnergy=True, speed=True),
    ]
    start = time.perf_counter()
    bar = tqdm(total=n_frames, unit="frame", disable=not progress, desc=Path(pdb_path).stem)
    try:
        done = 0
        while done < n_frames:
            k = min(every, n_frames - done)
            sim.step(k)  # one chunk = one report interval; the integrator backmaps only at its end
            for frame_trans in integrator.recent_ca_nm(k):
                ca_dcd.writeModel(frame_trans * unit.nanometer)
            done += k
            wall = time.perf_counter() - start
            bar.set_postfix(ns=f"{done * dt_ns:g}", ns_per_day=f"{done * dt_ns / wall * 86400:.3g}", refresh=False)
            bar.update(k)
    finally:
        bar.close()
        ca_handle.close()
        log_handle.close()
        for r in sim.reporters:
            if hasattr(r, "_out"):
                r._out.close()
    wall = time.perf_counter() - start
    record = {
        "input": str(pdb_path), "time_ns": time_ns, "dt_ns": dt_ns, "report_every_ns": report_ns,
        "frames": n_frames, "all_atom_frames": n_frames // every, "seed": seed, "device": integrator.device,
        "model": str(model) if model else "bundled default", "backmap": backmap,
        "backmap_dielectric": VACUUM_DIELECTRIC if backmap == "vacuum" else None, "ca_geometry": bool(ca_geometry),
        "sampling": integrator.sampling_config.to_dict(), "forcefield": list(forcefield),
        "wall_s": wall, "ns_per_day": time_ns / wall * 86400, "strained_frames": integrator.strained_frames,
        "ca_repaired_frames": integrator.ca_repaired_frames,
        "ca_projection": integrator.ca_projection,
        "removed_by_preparation": getattr(prepared, "removed", {}),
    }
    return _finish_run(out, tmp, record)


def run_replicas(pdb_path, out_dir, time_ns: float, dt_ns: float, report_ns: float, n_replicas: int, *,
                 model=None, device="auto", seed=None, steps=None, backmap="vacuum",
                 forcefield=("amber14-all.xml", "implicit/gbn2.xml"), progress=True, ca_geometry=True) -> dict:
    """K trajectories batched through the model (replicas.py): out_dir/prepared.pdb, ca.pdb, run.json
    and replica_k/{traj.dcd, traj_ca.dcd} for k < K. Returns the run record."""
    import dataclasses

    from openmm import app, unit
    from tqdm.auto import tqdm

    from .checkpoints import load_model
    from .integrator import DT_RANGE_NS, _resolve_device
    from .replicas import ReplicaGenerator

    if not DT_RANGE_NS[0] <= dt_ns <= DT_RANGE_NS[1]:
        raise ValueError(f"dt={dt_ns:g} ns is outside the {DT_RANGE_NS[0]:g}-{DT_RANGE_NS[1]:g} ns range STAR-MD "
                         "is trained on; choose a dt in that range.")
    n_frames, every, out, tmp, prepared, system, seed, ca_top = _start_run(
        pdb_path, out_dir, time_ns, dt_ns, report_ns, forcefield, seed)
    device = _resolve_device(device)
    loaded = load_model(model, device=device)
    sampling = loaded.sampling_config if steps is None else dataclasses.replace(loaded.sampling_config, steps=steps)
    gen = ReplicaGenerator(prepared.topology, prepared.positions, system, loaded, dt_ns, n_replicas, seed,
                           device=device, sampling=sampling, backmap=backmap, ca_geometry=ca_geometry)
    handles, all_atom, ca_dcds = [], [], []
    for k in range(n_replicas):
        (tmp / f"replica_{k}").mkdir()
        fa = open(tmp / f"replica_{k}" / "traj.dcd", "wb")
        fc = open(tmp / f"replica_{k}" / "traj_ca.dcd", "wb")
        handles += [fa, fc]
        all_atom.append(app.DCDFile(fa, prepared.topology, dt_ns * unit.nanoseconds, firstStep=every, interval=every))
        ca_dcds.append(app.DCDFile(fc, ca_top, dt_ns * unit.nanoseconds, firstStep=1, interval=1))
    start = time.perf_counter()
    bar = tqdm(total=n_frames, unit="frame", disable=not progress, desc=f"{Path(pdb_path).stem} x{n_replicas}")
    done = 0
    try:
        for ca, positions in gen.run(n_frames, every):
            for k in range(n_replicas):
                for frame in ca[k]:
                    ca_dcds[k].writeModel(frame * unit.nanometer)
                all_atom[k].writeModel(positions[k] * unit.nanometer)
            done += ca.shape[1]
            wall = time.perf_counter() - start
            bar.set_postfix(ns=f"{done * dt_ns:g}", ns_per_day=f"{n_replicas * done * dt_ns / wall * 86400:.3g}",
                            refresh=False)
            bar.update(ca.shape[1])
    finally:
        bar.close()
        for h in handles:
            h.close()
    wall = time.perf_counter() - start
    record = {
        "input": str(pdb_path), "time_ns": time_ns, "dt_ns": dt_ns, "report_every_ns": report_ns,
        "frames": n_frames, "all_atom_frames": n_frames // every, "replicas": n_replicas, "seed": seed,
        "device": device, "model": str(model) if model else "bundled default", "backmap": backmap,
        "backmap_dielectric": gen.backmapper.dielectric if backmap == "vacuum" else None,
        "ca_geometry": bool(ca_geometry), "sampling": sampling.to_dict(), "forcefield": list(forcefield), "wall_s": wall,
        "ns_per_day": n_replicas * time_ns / wall * 86400, "strained_frames": gen.backmapper.strained_frames,
        "ca_repaired_frames": gen.backmapper.ca_repaired_frames,
        "ca_projection": dict(gen.sampler.ca_projection),
        "removed_by_preparation": getattr(prepared, "removed", {}),
    }
    return _finish_run(out, tmp, record)


def _projection_line(stats: dict) -> str:
    """One sentence on what the Cα projection did (``StarMDIntegrator.ca_projection``)."""
    line = (f"the Cα projection moved {stats['moved']} of {stats['frames']} generated frames back into the bounds MD "
            f"keeps (largest violation {stats['max_violation_nm'] * 10:.2f} Å, largest residue move "
            f"{stats['max_move_nm'] * 10:.2f} Å); --no-ca-geometry keeps the network's frames as drawn.")
    if stats.get("unconverged"):
        line += (f" {stats['unconverged']} frame(s) were too far from any protein for it to finish: the model is "
                 "outside what it was trained on.")
    return line


def _cmd_run(args) -> int:
    time_ns = parse_time_ns(args.time, "--time")
    dt_ns = parse_time_ns(args.dt, "--dt")
    report_ns = parse_time_ns(args.report_every, "--report-every")
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas} must be at least 1.")
    if args.replicas == 1:
        rec = run_one(args.input, args.out, time_ns, dt_ns, report_ns, model=args.model, device=args.device,
                      seed=args.seed, steps=args.steps, backmap=args.backmap, progress=not args.quiet,
                      ca_geometry=args.ca_geometry)
    else:
        rec = run_replicas(args.input, args.out, time_ns, dt_ns, report_ns, args.replicas, model=args.model,
                           device=args.device, seed=args.seed, steps=args.steps, backmap=args.backmap,
                           progress=not args.quiet, ca_geometry=args.ca_geometry)
    print(f"{args.out}: {args.replicas} x {rec['frames']} frames ({time_ns:g} ns each) in {rec['wall_s']:.1f} s, "
          f"{rec['ns_per_day']:.3g} ns/day in all on {rec['device']}")
    if rec.get("ca_geometry"):
        print(f"{args.out}: {_projection_line(rec['ca_projection'])}")
    if rec["strained_frames"]:
        print(f"{args.out}: {rec['strained_frames']} of the all-atom frames are strained beyond repair (atoms "
              "closer than 0.3 Å or a disulfide stretched beyond 2.3 Å; see the BackmapWarning): the model left "
              "what it was trained on. Check Cα validity with `starmd evaluate`.")
    return 0


def _cmd_run_many(args) -> int:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device
    if device == "auto" and world > 1:
        import torch

        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    with open(args.manifest) as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "input" not in rows[0]:
        raise ValueError(f"{args.manifest} needs a header with at least an 'input' column "
                         "(optional: name, time, dt, report_every, seed).")
    for i, row in enumerate(rows):
        if i % world != rank:
            continue
        name = row.get("name") or Path(row["input"]).stem
        out = Path(args.out) / name
        if (out / "run.json").exists():
            print(f"[rank {rank}] {name}: done already, skipped")
            continue
        seed = int(row["seed"]) if row.get("seed") else (None if args.seed is None else args.seed + i)
        rec = run_one(row["input"], out, parse_time_ns(row.get("time") or args.time, "time"),
                      parse_time_ns(row.get("dt") or args.dt, "dt"),
                      parse_time_ns(row.get("report_every") or args.report_every, "report_every"),
                      model=args.model, device=device, seed=seed, steps=args.steps, backmap=args.backmap,
                      progress=not args.quiet and rank == 0, ca_geometry=args.ca_geometry)
        print(f"[rank {rank}] {name}: {rec['frames']} frames, {rec['ns_per_day']:.3g} ns/day")
    return 0


def _add_generation_options(p, *, time_default="1us") -> None:
    p.add_argument("--time", default=time_default, help=f"simulated time with a unit (default {time_default})")
    p.add_argument("--dt", default="1ns", help="time per generated frame, 0.01-10 ns (default 1ns)")
    p.add_argument("--report-every", default="10ns", help="all-atom output interval (default 10ns)")
    p.add_argument("--model", default=None, help="model file from training/train.py --export (default: bundled)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--steps", type=int, default=None, help="reverse diffusion steps per frame (default: the model's)")
    p.add_argument("--backmap", default="vacuum", choices=["vacuum", "system", "none"],
                   help="all-atom reconstruction: restrained minimisation without implicit solvent (fast, "
                        "default), under the full System, or rigid transport only")
    p.add_argument("--no-ca-geometry", dest="ca_geometry", action="store_false",
                   help="keep the network's Cα traces as drawn; by default each frame's chain links (3.6-4.1 Å) and "
                        "Cα contacts (>= 3.5 Å) are held where MD keeps them, like SHAKE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .cli_evaluate import add_evaluate_parser

    parser = argparse.ArgumentParser(
        prog="starmd",
        description="STAR-MD generative protein dynamics for OpenMM: generate microseconds of all-atom "
                    "trajectories from one structure, and evaluate them against reference MD.",
        epilog="examples:\n  starmd run protein.pdb --time 1us --dt 1ns --report-every 10ns -o out/\n"
               "  starmd evaluate --reference md.dcd --top ref.pdb --generated out/traj.dcd --dt-ns 10 --out report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="generate a trajectory from one structure",
                       description="Prepare a structure (PDBFixer) and generate a trajectory with STAR-MD; "
                                   "writes prepared.pdb, traj.dcd (all-atom), traj_ca.dcd + ca.pdb (every "
                                   "frame), log.csv and run.json.")
    p.add_argument("input", help="PDB or mmCIF file of the protein")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--replicas", type=int, default=1, help="K independent trajectories batched through the model "
                   "in one pass (written to out/replica_k/)")
    _add_generation_options(p)
    p.set_defaults(func=_cmd_run)
    q = sub.add_parser("run-many", help="generate for a CSV list of proteins (torchrun splits it over ranks)",
                       description="Generate for every row of a CSV (columns: input, and optionally name, time, "
                                   "dt, report_every, seed). Under torchrun each rank takes its share on its own "
                                   "device; finished proteins (run.json present) are skipped, so reruns resume.")
    q.add_argument("manifest", help="CSV file of inputs")
    q.add_argument("-o", "--out", required=True, help="output root; one folder per protein")
    _add_generation_options(q)
    q.set_defaults(func=_cmd_run_many)
    add_evaluate_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"starmd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
