#!/usr/bin/env python
"""Reference MD for STAR-MD training: one protein, one replica, resumable.

STAR-MD learns from ATLAS (3 x 100 ns per chain, frames every 10 ps). We cannot download ATLAS
here, so this script makes the same kind of data with OpenMM: PDB in → :func:`prepare_protein`
→ implicit-solvent (or explicit) System → minimise → equilibrate (not saved) → production with a
frame every ``--frame-ps`` written to ``traj.dcd``.

Output directory (``training/md/<protein>/r<k>/`` by convention)::

    record.json      every setting, seed, versions, platform, preparation report, run segments
    system.xml       the serialised System (so a resume simulates exactly the same Hamiltonian)
    start.pdb        all atoms at the start of production (the resume topology)
    topology.pdb     the atoms stored in traj.dcd (protein only), for mdtraj
    traj.dcd         production frames; frame k is at time (k + 1) * frame_ps (a run restored on
                     a new machine by restore_md.py keeps frames before record["dcd_first_frame"]
                     in prefix.npz, and its DCD starts there)
    checkpoint.json  {"frames": n, "step": s, "state_xml": ...}: the last consistent point
    done             written when the requested length is reached

Choices (the paper is silent; ATLAS used CHARMM36m/TIP3P explicit solvent on GPUs):

- Default force field amber99sbildn + amber99_obc (OpenMM's native GBSAOBCForce, about 7x faster
  on CPU than amber14 + implicit/gbn2, which becomes a CustomGBForce). ``--forcefield gbn2`` and
  ``--forcefield tip3p`` (amber14 + TIP3P, PME, 1 nm padding, 0.15 M NaCl, 1 bar barostat) are
  available. Implicit runs use a 1.2 nm non-periodic cutoff (``--cutoff-nm``, 0 = none): on this
  CPU it is ~1.4x faster than no cutoff for 50-residue proteins.
- HBonds constraints, hydrogen mass repartitioning to 1.5 amu and a 4 fs step with
  LangevinMiddleIntegrator (the combination OpenMM-Setup uses by default), 300 K, 1/ps friction.
- Resumability: every ``--checkpoint-frames`` frames the DCD is flushed and fsync'ed, then the
  full State (positions, velocities, step, time; XML, portable across CPU/CUDA) is written with
  the frame count to ``checkpoint.json.tmp`` and atomically renamed. A rerun truncates the DCD to
  that frame count (DCD records have a fixed size, so truncation is exact; the header frame
  count is rewritten) and appends, so no frame is lost or duplicated. The Langevin RNG is
  reseeded on resume with ``seed + frames`` so segments do not replay the same noise.
- A rerun with a larger ``--ns`` extends a finished run (the ``done`` marker is removed), which
  is how ``run_queue.py`` grows every protein round-robin.
- Only protein atoms go to the DCD (explicit water would make it 10x larger and STAR-MD models
  the backbone only); positions are not wrapped into the box.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform as _platform
import random
import socket
import struct
import sys
import time

import numpy as np
import openmm as mm
import openmm.app as app
import openmm.unit as u

from openmm_starmd.data import sha256_file
from openmm_starmd.prepare import prepare_protein

FORCEFIELDS = {
    "amber99-obc": ("amber99sbildn.xml", "amber99_obc.xml"),
    "gbn2": ("amber14-all.xml", "implicit/gbn2.xml"),
    "tip3p": ("amber14-all.xml", "amber14/tip3p.xml"),
}
#: Settings that must match between a run and its resume; anything else may change.
_FIXED_SETTINGS = (
    "pdb_sha256", "forcefield", "frame_ps", "step_fs", "temperature_k", "friction_per_ps",
    "hydrogen_mass_amu", "seed", "cutoff_nm", "ph", "padding_nm", "ionic_strength_molar",
)


class SimulationSetupError(RuntimeError):
    """A run cannot start or resume; the message names the directory, problem and fix."""


# --------------------------------------------------------------------------------------------
# DCD bookkeeping
# --------------------------------------------------------------------------------------------

def dcd_layout(path: str) -> tuple[int, int, int, int]:
    """Return (header_bytes, frame_bytes, n_atoms, header_frame_count) of an OpenMM/CHARMM DCD.

    Frame size is 3 Fortran records of 4*n_atoms bytes plus a 56-byte unit-cell record when the
    header's box flag is set.
    """
    with open(path, "rb") as fh:
        head = fh.read(100)
        if len(head) < 100 or head[4:8] != b"CORD" or struct.unpack("<i", head[:4])[0] != 84:
            raise SimulationSetupError(f"{path}: not a DCD file written by OpenMM; delete it and rerun to restart.")
        n_header_frames = struct.unpack("<i", head[8:12])[0]
        has_box = struct.unpack("<i", head[48:52])[0]
        fh.seek(92)
        comment_bytes = struct.unpack("<i", fh.read(4))[0]
        fh.seek(104 + comment_bytes)
        n_atoms = struct.unpack("<i", fh.read(4))[0]
    header = 104 + comment_bytes + 8
    frame = 3 * (4 * n_atoms + 8) + (56 if has_box else 0)
    return header, frame, n_atoms, n_header_frames


def truncate_dcd(path: str, n_frames: int, first_step: int, interval: int) -> None:
    """Cut ``path`` to its first ``n_frames`` frames and make the header say so.

    Raises if the file holds fewer complete frames than requested (the checkpoint is then ahead
    of the trajectory, which the write order in :func:`run` rules out).
    """
    header, frame, _, _ = dcd_layout(path)
    size = os.path.getsize(path)
    complete = (size - header) // frame
    if complete < n_frames:
        raise SimulationSetupError(
            f"{path}: holds {complete} complete frames but the checkpoint says {n_frames}; "
            "delete the run directory and restart it."
        )
    with open(path, "r+b") as fh:
        fh.truncate(header + n_frames * frame)
        fh.seek(8)
        fh.write(struct.pack("<i", n_frames))
        fh.seek(20)
        fh.write(struct.pack("<i", first_step + max(n_frames - 1, 0) * interval))
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: str, obj) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_checkpoint_frames(run_dir: str) -> int:
    """Frames safely in ``run_dir/traj.dcd`` according to the last checkpoint (0 if none).

    Readers of growing trajectories (``training/prepare.py``) must use only this many frames.
    """
    path = os.path.join(run_dir, "checkpoint.json")
    if not os.path.exists(path):
        return 0
    with open(path) as fh:
        return int(json.load(fh)["frames"])


def choose_platform(name: str, threads: int):
    """Return (Platform, properties): CUDA when present and ``name == 'auto'``, else CPU."""
    available = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    if name == "auto":
        name = next((p for p in ("CUDA", "OpenCL") if p in available), "CPU")
    if name not in available:
        raise SimulationSetupError(f"platform {name!r} is not available (have {available}); pick one of those.")
    props = {}
    if name == "CPU" and threads > 0:
        props["Threads"] = str(threads)
    if name == "CUDA":
        props["Precision"] = "mixed"
    return mm.Platform.getPlatformByName(name), props


def build_system(topology, positions, forcefield: str, cutoff_nm: float, hydrogen_mass_amu: float,
                 padding_nm: float, ionic_strength_molar: float, temperature_k: float, seed: int = 0):
    """Create the System. Returns (system, topology, positions) (solvated for ``tip3p``)."""
    ff = app.ForceField(*FORCEFIELDS[forcefield])
    common = dict(constraints=app.HBonds, hydrogenMass=hydrogen_mass_amu * u.amu)
    if forcefield == "tip3p":
        random.seed(seed)  # Modeller.addSolvent picks the waters it turns into ions with `random`
        modeller = app.Modeller(topology, positions)
        modeller.addSolvent(ff, model="tip3p", padding=padding_nm * u.nanometer,
                            ionicStrength=ionic_strength_molar * u.molar)
        system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                 nonbondedCutoff=1.0 * u.nanometer, **common)
        system.addForce(mm.MonteCarloBarostat(1.0 * u.bar, temperature_k * u.kelvin))
        return system, modeller.topology, modeller.positions
    # Implicit solvent is non-periodic; a CRYST1 record left in the input would otherwise put a
    # meaningless unit cell into every DCD frame.
    topology.setPeriodicBoxVectors(None)
    if cutoff_nm > 0:
        system = ff.createSystem(topology, nonbondedMethod=app.CutoffNonPeriodic,
                                 nonbondedCutoff=cutoff_nm * u.nanometer, **common)
    else:
        system = ff.createSystem(topology, nonbondedMethod=app.NoCutoff, **common)
    return system, topology, positions


def _protein_subset(topology):
    """Indices of protein atoms and a Topology containing only them (for the DCD)."""
    keep = [a.index for a in topology.atoms() if a.residue.name not in ("HOH", "NA", "CL", "K")]
    modeller = app.Modeller(topology, [mm.Vec3(0, 0, 0)] * topology.getNumAtoms() * u.nanometer)
    drop = [a for a in topology.atoms() if a.index not in set(keep)]
    modeller.delete(drop)
    return np.asarray(keep, dtype=int), modeller.topology


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def settings_from_args(args) -> dict:
    """The record of every setting that defines the run."""
    return {
        "pdb": os.path.abspath(args.pdb),
        "pdb_sha256": sha256_file(args.pdb),
        "forcefield": args.forcefield,
        "forcefield_files": list(FORCEFIELDS[args.forcefield]),
        "ns": args.ns,
        "frame_ps": args.frame_ps,
        "step_fs": args.step_fs,
        "equil_ps": args.equil_ps,
        "temperature_k": args.temperature,
        "friction_per_ps": args.friction,
        "hydrogen_mass_amu": args.hydrogen_mass,
        "constraints": "HBonds",
        "integrator": "LangevinMiddleIntegrator",
        "cutoff_nm": 0.0 if args.forcefield == "tip3p" else args.cutoff_nm,
        "ph": args.ph,
        "padding_nm": args.padding_nm if args.forcefield == "tip3p" else None,
        "ionic_strength_molar": args.ionic_strength if args.forcefield == "tip3p" else None,
        "seed": args.seed,
        "checkpoint_frames": args.checkpoint_frames,
    }


def _log(msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def _setup(args, out: str, settings: dict, platform, props):
    """Prepare, build, minimise and equilibrate; write the start files and checkpoint 0."""
    prepared = prepare_protein(args.pdb, ph=args.ph, allow_metals=False,
                               replace_nonstandard=args.replace_nonstandard)
    system, topology, positions = build_system(
        prepared.topology, prepared.positions, args.forcefield, settings["cutoff_nm"],
        args.hydrogen_mass, args.padding_nm, args.ionic_strength, args.temperature, args.seed)
    integrator = mm.LangevinMiddleIntegrator(args.temperature * u.kelvin, args.friction / u.picosecond,
                                             args.step_fs * u.femtosecond)
    integrator.setRandomNumberSeed(args.seed)
    sim = app.Simulation(topology, system, integrator, platform, props)
    sim.context.setPositions(positions)
    _log(f"{out}: minimising {topology.getNumAtoms()} atoms")
    sim.minimizeEnergy()
    sim.context.setVelocitiesToTemperature(args.temperature * u.kelvin, args.seed)
    n_equil = int(round(args.equil_ps * 1000 / args.step_fs))
    _log(f"{out}: equilibrating {args.equil_ps} ps ({n_equil} steps)")
    sim.step(n_equil)
    # Production time starts at zero so frame k sits at (k + 1) * frame_ps.
    sim.context.setTime(0.0)
    sim.context.setStepCount(0)
    state = sim.context.getState(getPositions=True, getVelocities=True, getParameters=True)
    pos = state.getPositions(asNumpy=True)
    with open(os.path.join(out, "start.pdb.tmp"), "w") as fh:
        app.PDBFile.writeFile(topology, pos, fh, keepIds=True)
    os.replace(os.path.join(out, "start.pdb.tmp"), os.path.join(out, "start.pdb"))
    idx, sub_top = _protein_subset(topology)
    with open(os.path.join(out, "topology.pdb.tmp"), "w") as fh:
        app.PDBFile.writeFile(sub_top, pos[idx], fh, keepIds=True)
    os.replace(os.path.join(out, "topology.pdb.tmp"), os.path.join(out, "topology.pdb"))
    _atomic_write_text(os.path.join(out, "system.xml"), mm.XmlSerializer.serialize(system))
    record = {
        "settings": settings,
        "n_atoms": topology.getNumAtoms(),
        "n_dcd_atoms": int(len(idx)),
        "n_residues": prepared.n_residues,
        "preparation": {"removed": prepared.removed, "added": prepared.added,
                        "stripped_hydrogens": prepared.stripped_hydrogens, "warnings": prepared.warnings},
        "versions": {"openmm": mm.__version__, "python": _platform.python_version(), "numpy": np.__version__},
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": sys.argv,
        "segments": [],
    }
    _atomic_write_json(os.path.join(out, "record.json"), record)
    _atomic_write_json(os.path.join(out, "checkpoint.json"),
                       {"frames": 0, "step": 0, "state_xml": mm.XmlSerializer.serialize(state)})
    dcd = os.path.join(out, "traj.dcd")
    if os.path.exists(dcd):
        os.remove(dcd)  # left by an earlier attempt that died before checkpoint 0


def run(args) -> int:
    """Run or resume one trajectory. Returns the number of frames in the finished trajectory."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    settings = settings_from_args(args)
    steps_per_frame = args.frame_ps * 1000.0 / args.step_fs
    if abs(steps_per_frame - round(steps_per_frame)) > 1e-9 or steps_per_frame < 1:
        raise SimulationSetupError(
            f"--frame-ps {args.frame_ps} is not a whole number of {args.step_fs} fs steps; choose a multiple of the step.")
    steps_per_frame = int(round(steps_per_frame))
    target_frames = int(round(args.ns * 1000.0 / args.frame_ps))
    platform, props = choose_platform(args.platform, args.threads)

    record_path = os.path.join(out, "record.json")
    ckpt_path = os.path.join(out, "checkpoint.json")
    if os.path.exists(record_path) and os.path.exists(ckpt_path):
        with open(record_path) as fh:
            record = json.load(fh)
        old = record["settings"]
        diff = [k for k in _FIXED_SETTINGS if old.get(k) != settings.get(k)]
        if diff:
            raise SimulationSetupError(
                f"{out}: existing run differs in {', '.join(f'{k} ({old.get(k)} -> {settings.get(k)})' for k in diff)}; "
                "use another --out directory or delete this one.")
    else:
        _setup(args, out, settings, platform, props)
        with open(record_path) as fh:
            record = json.load(fh)

    with open(ckpt_path) as fh:
        ckpt = json.load(fh)
    frames = int(ckpt["frames"])
    done_path = os.path.join(out, "done")
    if frames >= target_frames:
        _atomic_write_json(done_path, {"frames": frames, "ns": frames * args.frame_ps / 1000.0})
        _log(f"{out}: already has {frames} frames (>= {target_frames}); nothing to do")
        return frames
    if os.path.exists(done_path):
        os.remove(done_path)  # extending a finished run

    with open(os.path.join(out, "system.xml")) as fh:
        system = mm.XmlSerializer.deserialize(fh.read())
    topology = app.PDBFile(os.path.join(out, "start.pdb")).topology
    idx, sub_top = _protein_subset(topology)
    state = mm.XmlSerializer.deserialize(ckpt["state_xml"])
    integrator = mm.LangevinMiddleIntegrator(args.temperature * u.kelvin, args.friction / u.picosecond,
                                             args.step_fs * u.femtosecond)
    # Fresh noise per segment: reusing the seed after a resume would replay the same kicks.
    integrator.setRandomNumberSeed(args.seed + frames)
    sim = app.Simulation(topology, system, integrator, platform, props)
    sim.context.setState(state)
    sim.context.setStepCount(int(ckpt["step"]))

    dcd_path = os.path.join(out, "traj.dcd")
    dt_ps = args.step_fs / 1000.0
    # A restored run (training/restore_md.py) keeps its first frames in prefix.npz; its DCD starts
    # at frame dcd_first_frame.
    first = int(record.get("dcd_first_frame", 0))
    if frames < first:
        raise SimulationSetupError(f"{out}: checkpoint at frame {frames} is before the DCD's first frame {first}; "
                                   "delete the run directory and restore it again (training/restore_md.py).")
    first_step = (first + 1) * steps_per_frame
    if frames == first or not os.path.exists(dcd_path):
        if frames > first:
            raise SimulationSetupError(f"{dcd_path}: missing although the checkpoint has {frames} frames; delete {out} and restart.")
        fh = open(dcd_path, "w+b")
        dcd = app.DCDFile(fh, sub_top, dt_ps * u.picosecond, firstStep=first_step, interval=steps_per_frame)
    else:
        truncate_dcd(dcd_path, frames - first, first_step, steps_per_frame)
        fh = open(dcd_path, "r+b")
        dcd = app.DCDFile(fh, sub_top, dt_ps * u.picosecond, firstStep=first_step,
                          interval=steps_per_frame, append=True)

    from tqdm import tqdm

    seg = {"start_frame": frames, "platform": platform.getName(), "properties": props,
           "started": _dt.datetime.now().isoformat(timespec="seconds")}
    _log(f"{out}: production frames {frames} -> {target_frames} on {platform.getName()} {props}")
    frame_ns = args.frame_ps / 1000.0
    # A live bar on a terminal; in a log file (the detached queue) one line per checkpoint instead.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=round(target_frames * frame_ns, 3), initial=round(frames * frame_ns, 3), unit="ns",
               desc=os.path.basename(os.path.dirname(out)) + "/" + os.path.basename(out),
               file=sys.stderr, disable=not interactive,
               bar_format="{desc}: {n:.2f}/{total:.2f} ns |{bar}| {postfix}")
    t0 = time.time()
    start_frames = frames
    stop_after = args.stop_after_frames

    def checkpoint():
        fh.flush()
        os.fsync(fh.fileno())
        st = sim.context.getState(getPositions=True, getVelocities=True, getParameters=True)
        _atomic_write_json(ckpt_path, {"frames": frames, "step": int(sim.context.getStepCount()),
                                       "state_xml": mm.XmlSerializer.serialize(st)})

    try:
        while frames < target_frames:
            sim.step(steps_per_frame)
            st = sim.context.getState(getPositions=True)
            pos = st.getPositions(asNumpy=True).value_in_unit(u.nanometer)
            if not np.all(np.isfinite(pos)):
                raise SimulationSetupError(f"{out}: positions became NaN at frame {frames}; the run blew up, "
                                           "restart it with a smaller --step-fs.")
            dcd.writeModel(pos[idx] * u.nanometer)
            frames += 1
            if frames % args.checkpoint_frames == 0 or frames == target_frames:
                checkpoint()
                elapsed = time.time() - t0
                rate = (frames - start_frames) * frame_ns / elapsed * 86400.0 if elapsed > 0 else 0.0
                left = (target_frames - frames) * frame_ns / rate * 86400.0 if rate > 0 else float("inf")
                eta = _dt.timedelta(seconds=int(left)) if math.isfinite(left) else "?"
                bar.set_postfix_str(f"{rate:.1f} ns/day, ETA {eta}", refresh=False)
                bar.update(round(frames * frame_ns - bar.n, 6))
                if not interactive:
                    _log(f"{out}: {frames * frame_ns:.3f}/{target_frames * frame_ns:.3f} ns, "
                         f"{rate:.1f} ns/day, ETA {eta}")
            if stop_after is not None and frames - start_frames >= stop_after:
                # Test hook: stop as if killed, leaving any frames after the last checkpoint
                # in the DCD (a resume must discard them).
                _log(f"{out}: --stop-after-frames reached at frame {frames}")
                fh.flush()
                if args.hard_stop:
                    os._exit(3)
                break
    finally:
        bar.close()
        fh.close()
        elapsed = time.time() - t0
        seg.update(end_frame=read_checkpoint_frames(out), wall_s=round(elapsed, 1),
                   ns_per_day=round((frames - start_frames) * frame_ns / elapsed * 86400.0, 2) if elapsed > 0 else None)
        record["segments"].append(seg)
        record["settings"]["ns"] = max(record["settings"].get("ns", 0), args.ns)
        _atomic_write_json(record_path, record)
    if frames >= target_frames:
        _atomic_write_json(done_path, {"frames": frames, "ns": frames * frame_ns})
        _log(f"{out}: done, {frames} frames ({frames * frame_ns:.2f} ns), {seg['ns_per_day']} ns/day")
    return frames


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Resumable reference MD of one protein for STAR-MD training data "
                    "(prepare with PDBFixer, implicit solvent by default, DCD frames every --frame-ps). "
                    "Rerunning the same command resumes; a larger --ns extends a finished run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pdb", help="input PDB/mmCIF file")
    p.add_argument("--out", required=True, help="run directory, e.g. training/md/1ENH/r0")
    p.add_argument("--ns", type=float, default=1.0, help="total production length to reach (ns)")
    p.add_argument("--frame-ps", type=float, default=10.0, help="spacing of saved frames (ps)")
    p.add_argument("--step-fs", type=float, default=4.0, help="integration step (fs); 4 fs needs HMR")
    p.add_argument("--equil-ps", type=float, default=100.0, help="unsaved equilibration after minimisation (ps)")
    p.add_argument("--temperature", type=float, default=300.0, help="temperature (K)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    p.add_argument("--hydrogen-mass", type=float, default=1.5, help="hydrogen mass after repartitioning (amu)")
    p.add_argument("--forcefield", choices=sorted(FORCEFIELDS), default="amber99-obc",
                   help="amber99-obc: amber99sbildn + OBC GBSA; gbn2: amber14 + GBn2; tip3p: amber14 + TIP3P/PME")
    p.add_argument("--cutoff-nm", type=float, default=1.2, help="implicit-solvent non-periodic cutoff (nm); 0 = none")
    p.add_argument("--padding-nm", type=float, default=1.0, help="water padding for --forcefield tip3p (nm)")
    p.add_argument("--ionic-strength", type=float, default=0.15, help="NaCl for --forcefield tip3p (molar)")
    p.add_argument("--ph", type=float, default=7.0, help="pH for protonation states")
    p.add_argument("--replace-nonstandard", action="store_true", help="replace known non-standard residues (MSE->MET, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed for velocities and Langevin noise")
    p.add_argument("--platform", default="auto", help="auto (CUDA > OpenCL > CPU), CUDA, OpenCL, CPU, Reference")
    p.add_argument("--threads", type=int, default=1, help="CPU platform threads (0 = OpenMM default)")
    p.add_argument("--checkpoint-frames", type=int, default=10, help="checkpoint every this many frames")
    p.add_argument("--stop-after-frames", type=int, default=None,
                   help="test hook: stop after this many new frames, as if killed")
    p.add_argument("--hard-stop", action="store_true",
                   help="test hook: with --stop-after-frames, exit the process abruptly (no cleanup)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SimulationSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
