#!/usr/bin/env python
"""Bring reference MD back to a machine that has only the git checkout.

The all-atom run directories of ``simulate.py`` (``training/md/<protein>/r<k>/``: DCD, System,
checkpoints) are not in git; only the backbone shards are. A fresh machine (every CI clone, and
every new session of ours) therefore cannot resume a trajectory from the run directory, and
restarting it from scratch throws away hours of MD. Two things fix that:

1. **Committed MD state** (``training/md_state/<protein>/r<k>/``, written by
   ``training/prepare.py`` together with the shards): ``record.json``, ``start.pdb``,
   ``topology.pdb``, ``system.xml.gz`` and ``checkpoint.json.gz``, the full State (positions,
   velocities, step) at exactly the shard's last frame. :func:`restore_exact` rebuilds the run
   directory from it: the trajectory goes on from the same microstate, as a resume on the old
   machine would (the Langevin noise is reseeded with ``seed + frames``, as on every resume).
   ~60 kB per trajectory, gzip'ed deterministically so unchanged states do not churn git.
2. **Reconstruction** when no committed state matches the shard (trajectories from before the
   state was committed): :func:`restore_reconstructed` rebuilds the *same System* (same
   structure, preparation, force field and settings, from the plan) and an all-atom state whose
   backbone is the shard's last frame: every residue of the prepared structure is superposed
   rigidly on that frame's N, CA, C, O (Kabsch), the structure is minimised with N, CA, C and O
   harmonically restrained (5e4 kJ/mol/nm²) to the shard, then given Maxwell-Boltzmann velocities
   and equilibrated 20 ps under the same restraints (Langevin, 300 K); production then goes on
   unrestrained. The backbone is continuous (within ~0.1 Å), the side chains and hydrogens are
   re-equilibrated: the trajectory has a *restart* at that frame, recorded in ``record.json``
   (``restarts``) and carried into the shard's provenance, so it can be measured and, if need be,
   excluded (``training/junction_check.py`` compares the 10-ps backbone steps across restarts
   with ordinary ones).

Either way the run directory gets ``prefix.npz`` (the shard's frames so far) and
``record.json["dcd_first_frame"]``: the local ``traj.dcd`` holds only frames from there on, and
``prepare.py`` joins prefix and DCD into one shard.

Run ``python training/restore_md.py`` to restore every trajectory of the manifest that has no
run directory; ``run_queue.py`` calls :func:`ensure_run_dir` before each job, so workers do it
on their own.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import io
import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import simulate  # noqa: E402

DEFAULT_STATE_ROOT = os.path.join(HERE, "md_state")
DEFAULT_MANIFEST = os.path.join(HERE, "data", "manifest.json")

#: Restraint on N, CA, C, O while side chains are rebuilt (kJ/mol/nm²): thermal RMS 0.07 Å per axis.
RESTRAINT_K = 5.0e4
#: Restrained equilibration after reconstruction (ps).
RESTRAINED_EQUIL_PS = 20.0
#: Files of a committed MD state; the two large ones gzip'ed.
STATE_FILES = ("record.json", "start.pdb", "topology.pdb")
GZ_FILES = ("system.xml", "checkpoint.json")


class RestoreError(RuntimeError):
    """A trajectory cannot be restored; the message names it, the problem and the fix."""


# --------------------------------------------------------------------------------------------
# committed state: write (prepare.py) and read
# --------------------------------------------------------------------------------------------

def _read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def _gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def _write_if_changed(path: str, data: bytes) -> bool:
    if os.path.exists(path):
        with open(path, "rb") as fh:
            if fh.read() == data:
                return False
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return True


def export_state(run_dir: str, checkpoint_text: str, state_dir: str) -> None:
    """Copy one run's restart files to ``state_dir`` (committed), with the checkpoint given as
    the exact text the shard was cut at (so state and shard agree on the frame count)."""
    os.makedirs(state_dir, exist_ok=True)
    for name in STATE_FILES:
        with open(os.path.join(run_dir, name), "rb") as fh:
            _write_if_changed(os.path.join(state_dir, name), fh.read())
    with open(os.path.join(run_dir, "system.xml"), "rb") as fh:
        _write_if_changed(os.path.join(state_dir, "system.xml.gz"), _gzip_bytes(fh.read()))
    # the run's `done` marker (its requested length reached) travels too: the manifest's
    # "complete" flag, which the evaluation requires, is read from it
    done = os.path.join(run_dir, "done")
    frames = int(json.loads(checkpoint_text)["frames"])
    if os.path.exists(done) and int(_read_json(done)["frames"]) == frames:
        with open(done, "rb") as fh:
            _write_if_changed(os.path.join(state_dir, "done"), fh.read())
    elif os.path.exists(os.path.join(state_dir, "done")):
        os.remove(os.path.join(state_dir, "done"))
    # checkpoint last: a state directory with a checkpoint is complete
    _write_if_changed(os.path.join(state_dir, "checkpoint.json.gz"), _gzip_bytes(checkpoint_text.encode()))


#: Frames of the all-atom sample kept with the state of a test trajectory (allatom_sample.dcd).
SAMPLE_FRAMES = 100


def export_allatom_sample(run_dir: str, checkpoint_text: str, state_dir: str) -> bool:
    """Keep up to :data:`SAMPLE_FRAMES` evenly spaced all-atom frames of the run's local DCD in
    ``state_dir/allatom_sample.dcd`` (+ ``.json``): the evaluation fits its all-atom validity
    thresholds on all-atom MD, which the shards do not hold and a fresh clone would otherwise
    lack. Written when missing or when the local DCD has grown to twice the frames it was taken
    from. Returns whether it wrote."""
    import mdtraj as md

    record = _read_json(os.path.join(run_dir, "record.json"))
    total = int(json.loads(checkpoint_text)["frames"])
    first = int(record.get("dcd_first_frame", 0))
    n_local = total - first
    meta_path = os.path.join(state_dir, "allatom_sample.json")
    if n_local < 10 or not os.path.exists(os.path.join(run_dir, "traj.dcd")):
        return False
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            if 2 * int(json.load(fh)["source_frames"]) > n_local:
                return False
    stride = max(1, -(-n_local // SAMPLE_FRAMES))
    with md.open(os.path.join(run_dir, "traj.dcd")) as fh:
        traj = fh.read_as_traj(md.load_topology(os.path.join(run_dir, "topology.pdb")), n_frames=n_local)
    sample = traj[::stride]
    tmp = os.path.join(state_dir, "allatom_sample.tmp.dcd")
    sample.save_dcd(tmp)
    os.replace(tmp, os.path.join(state_dir, "allatom_sample.dcd"))
    simulate._atomic_write_json(meta_path, {
        "source_frames": n_local, "first_frame": first, "stride": stride, "frames": sample.n_frames,
        "frame_ps": record["settings"]["frame_ps"],
        "note": "every stride-th checkpointed frame of the run's local traj.dcd from first_frame on; "
                "topology: topology.pdb next to it"})
    return True


def allatom_md(run_dir: str, min_frames: int = SAMPLE_FRAMES):
    """All-atom MD of a run on this machine for validity thresholds: (dcd, pdb, n_frames, what),
    or None. The local traj.dcd when it holds ``min_frames`` checkpointed frames, else the
    committed sample copied in by a restore (``allatom_sample.dcd``), else a shorter traj.dcd."""
    top = os.path.join(run_dir, "topology.pdb")
    dcd = os.path.join(run_dir, "traj.dcd")
    local = 0
    if os.path.exists(os.path.join(run_dir, "checkpoint.json")) and os.path.exists(dcd):
        record = _read_json(os.path.join(run_dir, "record.json"))
        local = simulate.read_checkpoint_frames(run_dir) - int(record.get("dcd_first_frame", 0))
    sample = os.path.join(run_dir, "allatom_sample.dcd")
    if local >= min_frames or (local >= 10 and not os.path.exists(sample)):
        return dcd, top, local, f"{local} frames of {os.path.relpath(dcd)}"
    if os.path.exists(sample) and os.path.exists(top):
        meta = _read_json(os.path.join(run_dir, "allatom_sample.json"))
        return sample, top, int(meta["frames"]), (f"{meta['frames']} frames sampled every {meta['stride']} of "
                                                  f"{meta['source_frames']} (committed with the MD state)")
    return None


def read_state_checkpoint(state_dir: str) -> dict | None:
    path = os.path.join(state_dir, "checkpoint.json.gz")
    if not os.path.exists(path):
        return None
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------
# restoring
# --------------------------------------------------------------------------------------------

def _manifest_entry(manifest_path: str, protein: str, replica: int):
    if not os.path.exists(manifest_path):
        return None, None
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest_path))
    for e in manifest.get("shards", []):
        if e["protein"] == protein and int(e["replica"]) == replica:
            return e, os.path.join(base, e["file"])
    return None, None


def _write_prefix(run_dir: str, shard, n_frames: int) -> None:
    from openmm_starmd.data import BackboneShard, save_shard

    prefix = BackboneShard(
        coords_nm=shard.coords_nm[:n_frames], frame_spacing_ns=shard.frame_spacing_ns, sequence=shard.sequence,
        residue_index=shard.residue_index, chain_index=shard.chain_index, chain_ids=shard.chain_ids,
        residue_mask=shard.residue_mask, time_ns=shard.time_ns[:n_frames], temperature_k=shard.temperature_k,
        forcefield=shard.forcefield, name=shard.name, replica=shard.replica, provenance=shard.provenance)
    save_shard(os.path.join(run_dir, "prefix.npz"), prefix)


def restore_exact(run_dir: str, state_dir: str, shard, log=print) -> int:
    """Rebuild ``run_dir`` from a committed state whose frame count the shard covers.
    Returns the frame count."""
    ckpt = read_state_checkpoint(state_dir)
    frames = int(ckpt["frames"])
    if frames > shard.n_frames:
        raise RestoreError(f"{state_dir}: state is at frame {frames} but the shard has only {shard.n_frames}; "
                           "the shard and state were not exported together — rerun training/prepare.py on the "
                           "machine that has the run, or delete the state directory to reconstruct instead.")
    tmp = run_dir.rstrip(os.sep) + ".restoring"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in STATE_FILES:
        shutil.copy(os.path.join(state_dir, name), os.path.join(tmp, name))
    for name in ("allatom_sample.dcd", "allatom_sample.json"):
        if os.path.exists(os.path.join(state_dir, name)):
            shutil.copy(os.path.join(state_dir, name), os.path.join(tmp, name))
    if os.path.exists(os.path.join(state_dir, "done")):
        with open(os.path.join(state_dir, "done")) as fh:
            if int(json.load(fh)["frames"]) == frames:
                shutil.copy(os.path.join(state_dir, "done"), os.path.join(tmp, "done"))
    with gzip.open(os.path.join(state_dir, "system.xml.gz"), "rb") as fh:
        simulate._atomic_write_text(os.path.join(tmp, "system.xml"), fh.read().decode())
    with open(os.path.join(tmp, "record.json")) as fh:
        record = json.load(fh)
    record["dcd_first_frame"] = frames
    record.setdefault("restores", []).append(
        {"frame": frames, "kind": "exact", "from": os.path.relpath(state_dir, HERE),
         "at": _dt.datetime.now().isoformat(timespec="seconds")})
    simulate._atomic_write_json(os.path.join(tmp, "record.json"), record)
    _write_prefix(tmp, shard, frames)
    simulate._atomic_write_json(os.path.join(tmp, "checkpoint.json"), ckpt)
    _install(tmp, run_dir)
    log(f"{run_dir}: restored exactly from {state_dir} at frame {frames}")
    return frames


def _install(tmp: str, run_dir: str) -> None:
    """Move a finished restore into place; a run directory without a checkpoint (left by a
    failed start) is replaced, one with a checkpoint never is."""
    if os.path.exists(os.path.join(run_dir, "checkpoint.json")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RestoreError(f"{run_dir}: already has a checkpoint (another process restored or ran it); "
                           "nothing was changed.")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.replace(tmp, run_dir)


def _kabsch_apply(src: np.ndarray, dst: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Move ``points`` by the rotation + translation that best superposes ``src`` on ``dst``."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u_, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u_.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u_.T
    return (points - cs) @ rot.T + cd


def backbone_indices(topology, shard) -> tuple[np.ndarray, list]:
    """Atom indices (N, 4) of N, CA, C, O of every shard residue in ``topology`` (-1: missing),
    found as the shard's reader found them, and the atom indices of each of those residues."""
    import mdtraj as md

    from openmm_starmd.data import _ONE as _ONE_LETTER, _backbone_layout

    top = md.Topology.from_openmm(topology)
    idx, seq, _, _, _ = _backbone_layout(top, "rebuilt structure")
    if idx.shape[0] != shard.n_residues or seq != shard.sequence:
        raise RestoreError(f"the rebuilt structure has {idx.shape[0]} residues ({seq}) but the shard has "
                           f"{shard.n_residues} ({shard.sequence}); the structure file or preparation changed "
                           "since the MD was run.")
    residues = [r for r in top.residues if r.is_protein or r.name in _ONE_LETTER]
    return idx, [[a.index for a in r.atoms] for r in residues]


def restore_reconstructed(run_dir: str, args, shard, log=print) -> int:
    """Rebuild ``run_dir`` around a new all-atom state whose backbone is the shard's last frame.

    ``args`` is the simulate.py namespace of the trajectory (``run_queue.job_args``); its fixed
    settings must equal those recorded in the shard. Returns the frame count (the shard's).
    """
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    from openmm_starmd.prepare import prepare_protein

    settings = simulate.settings_from_args(args)
    old = shard.provenance.get("settings", {})
    diff = [k for k in simulate._FIXED_SETTINGS if k in old and old.get(k) != settings.get(k)]
    if diff:
        raise RestoreError(f"{run_dir}: the shard was simulated with other settings "
                           f"({', '.join(f'{k}: {old.get(k)} vs {settings.get(k)}' for k in diff)}); "
                           "restore with the plan it was made with, or start a new replica.")
    frames = shard.n_frames
    steps_per_frame = int(round(args.frame_ps * 1000.0 / args.step_fs))
    prepared = prepare_protein(args.pdb, ph=args.ph, allow_metals=False, replace_nonstandard=args.replace_nonstandard)
    system, topology, positions = simulate.build_system(
        prepared.topology, prepared.positions, args.forcefield, settings["cutoff_nm"], args.hydrogen_mass,
        args.padding_nm, args.ionic_strength, args.temperature, args.seed)
    if args.forcefield == "tip3p":
        raise RestoreError(f"{run_dir}: reconstructing explicit-solvent runs is not supported (the solvent "
                           "would need re-equilibrating around the new backbone); start a new replica.")
    pos = np.asarray(positions.value_in_unit(u.nanometer), dtype=np.float64)
    idx4, residue_atoms = backbone_indices(topology, shard)
    target_all = shard.coords_nm[-1].astype(np.float64)  # (N, 4, 3): N, CA, C, O
    have = idx4 >= 0
    # rigid superposition of every residue of the prepared structure on the shard's last frame
    new = pos.copy()
    for i, atoms in enumerate(residue_atoms):
        if have[i].sum() >= 3:
            new[atoms] = _kabsch_apply(pos[idx4[i, have[i]]], target_all[i, have[i]], pos[atoms])
    bb = idx4[have]
    target = target_all[have]
    new[bb] = target

    restrained = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system))
    force = mm.CustomExternalForce("0.5*k_restore*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    force.addGlobalParameter("k_restore", RESTRAINT_K)
    for name in ("x0", "y0", "z0"):
        force.addPerParticleParameter(name)
    for atom, xyz in zip(bb, target):
        force.addParticle(int(atom), [float(v) for v in xyz])
    restrained.addForce(force)
    platform, props = simulate.choose_platform(args.platform, args.threads)
    integ = mm.LangevinMiddleIntegrator(args.temperature * u.kelvin, args.friction / u.picosecond,
                                       args.step_fs * u.femtosecond)
    seed = args.seed + 500_000 + frames  # distinct from every production segment's seed
    integ.setRandomNumberSeed(seed)
    ctx = mm.Context(restrained, integ, platform, props)
    ctx.setPositions(new)
    ctx.applyConstraints(1e-6)
    mm.LocalEnergyMinimizer.minimize(ctx, 10.0, 0)
    ctx.setVelocitiesToTemperature(args.temperature * u.kelvin, seed)
    n_eq = int(round(RESTRAINED_EQUIL_PS * 1000.0 / args.step_fs))
    log(f"{run_dir}: rebuilt {topology.getNumAtoms()} atoms on frame {frames} of the shard; "
        f"restrained equilibration {RESTRAINED_EQUIL_PS:g} ps")
    integ.step(n_eq)
    st = ctx.getState(getPositions=True, getVelocities=True, getEnergy=True)
    out = st.getPositions(asNumpy=True).value_in_unit(u.nanometer)
    dev = np.linalg.norm(out[bb] - target, axis=-1)
    rms_dev = float(np.sqrt(np.mean(dev ** 2)))
    if not np.all(np.isfinite(out)) or rms_dev > 0.05:
        raise RestoreError(f"{run_dir}: reconstruction failed (backbone RMS deviation {rms_dev * 10:.2f} Å after "
                           "restrained equilibration); start a new replica instead.")
    # the unrestrained production State: same positions and velocities, production clock
    prod = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    prod.setPositions(out)
    prod.setVelocities(st.getVelocities())
    prod.setTime(frames * args.frame_ps * u.picosecond)
    prod.setStepCount(frames * steps_per_frame)
    energy = prod.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    if not np.isfinite(energy):
        raise RestoreError(f"{run_dir}: reconstructed state has non-finite energy; start a new replica instead.")
    state = prod.getState(getPositions=True, getVelocities=True, getParameters=True)

    tmp = run_dir.rstrip(os.sep) + ".restoring"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "start.pdb"), "w") as fh:
        app.PDBFile.writeFile(topology, out * u.nanometer, fh, keepIds=True)
    idx, sub_top = simulate._protein_subset(topology)
    with open(os.path.join(tmp, "topology.pdb"), "w") as fh:
        app.PDBFile.writeFile(sub_top, out[idx] * u.nanometer, fh, keepIds=True)
    simulate._atomic_write_text(os.path.join(tmp, "system.xml"), mm.XmlSerializer.serialize(system))
    import platform as _platform

    restart = {"frame": frames, "kind": "reconstructed", "at": _dt.datetime.now().isoformat(timespec="seconds"),
               "method": f"per-residue Kabsch of the prepared structure on the shard's frame {frames - 1} "
                         f"(N, CA, C, O), minimised and {RESTRAINED_EQUIL_PS:g} ps Langevin under "
                         f"{RESTRAINT_K:g} kJ/mol/nm2 restraints on N, CA, C, O, then released",
               "backbone_rms_deviation_nm": round(rms_dev, 5), "potential_energy_kj": round(float(energy), 1),
               "seed": seed}
    record = {
        "settings": settings, "n_atoms": topology.getNumAtoms(), "n_dcd_atoms": int(len(idx)),
        "n_residues": prepared.n_residues,
        "preparation": {"removed": prepared.removed, "added": prepared.added,
                        "stripped_hydrogens": prepared.stripped_hydrogens, "warnings": prepared.warnings},
        "versions": {"openmm": mm.__version__, "python": _platform.python_version(), "numpy": np.__version__},
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
        "segments": shard.provenance.get("segments", []), "restarts": list(shard.provenance.get("restarts", []))
        + [restart], "dcd_first_frame": frames,
    }
    simulate._atomic_write_json(os.path.join(tmp, "record.json"), record)
    _write_prefix(tmp, shard, frames)
    simulate._atomic_write_json(os.path.join(tmp, "checkpoint.json"),
                                {"frames": frames, "step": frames * steps_per_frame,
                                 "state_xml": mm.XmlSerializer.serialize(state)})
    _install(tmp, run_dir)
    log(f"{run_dir}: reconstructed at frame {frames} (backbone RMS deviation {rms_dev * 10:.2f} Å, "
        f"energy {energy:.0f} kJ/mol); the trajectory has a restart there")
    return frames


def ensure_run_dir(run_dir: str, args, protein: str, replica: int, manifest_path: str = DEFAULT_MANIFEST,
                   state_root: str = DEFAULT_STATE_ROOT, log=print) -> str:
    """Make ``run_dir`` resumable on this machine. Returns what was done: "present" (it has a
    checkpoint), "fresh" (nothing to restore: the job starts from scratch), "exact" or
    "reconstructed"."""
    from openmm_starmd.data import load_shard

    if os.path.exists(os.path.join(run_dir, "checkpoint.json")):
        return "present"
    entry, shard_path = _manifest_entry(manifest_path, protein, replica)
    if entry is None or not os.path.exists(shard_path):
        return "fresh"
    shard = load_shard(shard_path, entry.get("sha256"))
    os.makedirs(os.path.dirname(run_dir.rstrip(os.sep)), exist_ok=True)
    state_dir = os.path.join(state_root, protein, f"r{replica}")
    ckpt = read_state_checkpoint(state_dir)
    if ckpt is not None and int(ckpt["frames"]) <= shard.n_frames:
        restore_exact(run_dir, state_dir, shard, log=log)
        return "exact"
    restore_reconstructed(run_dir, args, shard, log=log)
    return "reconstructed"


def main(argv=None) -> int:
    import run_queue

    p = argparse.ArgumentParser(description="Restore the run directories of every trajectory in the manifest that "
                                            "this machine lacks (exactly from training/md_state where possible, "
                                            "else reconstructed on the shard's last frame).")
    p.add_argument("--plan", default=run_queue.DEFAULT_PLAN)
    p.add_argument("--md-root", default=run_queue.DEFAULT_ROOT)
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    p.add_argument("--state-root", default=DEFAULT_STATE_ROOT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--platform", default="CPU")
    args = p.parse_args(argv)
    plan = run_queue.load_plan(args.plan)
    with open(args.manifest) as fh:
        manifest = json.load(fh)
    for e in manifest["shards"]:
        name, r = e["protein"], int(e["replica"])
        if name not in plan["proteins"]:
            continue
        run_dir = os.path.join(args.md_root, name, f"r{r}")
        job = run_queue.job_args(plan, name, r, e["total_ns"], args.md_root,
                                 ["--threads", str(args.threads), "--platform", args.platform])
        try:
            what = ensure_run_dir(run_dir, job, name, r, args.manifest, args.state_root)
        except RestoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{name}/r{r}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
