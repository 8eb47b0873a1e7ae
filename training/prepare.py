#!/usr/bin/env python
"""Reference trajectories → backbone shards + manifest (the training set of STAR-MD).

Walks ``<md-root>/<protein>/r<k>/`` (written by ``simulate.py``/``run_queue.py``), reads each
trajectory's backbone (only the frames up to the last checkpoint, so runs still growing in the
background are safe to read) and writes one shard per (protein, replica) to
``training/data/shards/<protein>_r<k>.npz`` plus ``training/data/manifest.json``:

    {"format_version": 1, "shards": [{"protein", "replica", "split", "file", "residues",
      "frames", "spacing_ns", "total_ns", "sha256", "complete", "source"}, ...]}

The split is by protein, never by frame, and comes from ``training/plan.json`` (test proteins
have two replicas there); proteins the plan does not list go to ``train``. Shards are rebuilt
only when the checkpointed frame count changed. ATLAS folders can be added with
``--atlas DIR`` (every ``<name>_prod_R1_fit.xtc`` found there; split ``train``, or as listed in
the plan).

``--summary`` prints the table (protein, split, residues, replicas, ns, frames) and the range of
Δt the data really covers for windows of ``--window`` frames, and of ``--min-window`` frames
(training/train.py's shortest examples): STAR-MD trains with Δt ~ LogUniform[0.01, 10] ns, and a
trajectory of F frames at spacing s only supports Δt ≤ s (F - 1) / (L - 1). Its last line says
whether the data floor (:data:`FLOOR`) is met and how much MD is still missing; ``--check-floor``
turns that into the exit status (0 met, 3 not), for scripts that train once it is.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import sys

import numpy as np

from openmm_starmd.data import (FORMAT_VERSION, TrajectoryError, load_shard, read_backbone_trajectory,
                                save_shard)

HERE = os.path.dirname(os.path.abspath(__file__))


def _splits_from_plan(plan_path: str | None) -> dict:
    if not plan_path or not os.path.exists(plan_path):
        return {}
    with open(plan_path) as fh:
        plan = json.load(fh)
    return {name: p.get("split", "train") for name, p in plan.get("proteins", {}).items()}


def find_runs(md_root: str) -> list[dict]:
    """Every run directory with a checkpoint: dicts with protein, replica, dir, frames, record."""
    runs = []
    for ckpt in sorted(glob.glob(os.path.join(md_root, "*", "r*", "checkpoint.json"))):
        run_dir = os.path.dirname(ckpt)
        replica = os.path.basename(run_dir)[1:]
        if not replica.isdigit():
            continue
        with open(ckpt) as fh:
            checkpoint_text = fh.read()  # read once: the shard and the exported state use this frame count
        frames = int(json.loads(checkpoint_text)["frames"])
        with open(os.path.join(run_dir, "record.json")) as fh:
            record = json.load(fh)
        runs.append(dict(protein=os.path.basename(os.path.dirname(run_dir)), replica=int(replica), dir=run_dir,
                         frames=frames, record=record, complete=os.path.exists(os.path.join(run_dir, "done")),
                         checkpoint_text=checkpoint_text))
    return runs


def shard_from_run(run: dict):
    """Read the checkpointed part of one simulate.py run as a BackboneShard.

    A run restored on this machine (``restore_md.py``) holds its first ``dcd_first_frame`` frames
    in ``prefix.npz`` and the rest in its DCD; the shard joins them, and its provenance lists the
    restores (``restores``: exact, from committed state) and restarts (``restarts``: side chains
    rebuilt on the backbone of that frame)."""
    s = run["record"]["settings"]
    record = run["record"]
    first = int(record.get("dcd_first_frame", 0))
    provenance = {"pdb_sha256": s.get("pdb_sha256"), "seed": s.get("seed"), "settings": s,
                  "openmm": record.get("versions", {}).get("openmm")}
    for key in ("restarts", "restores"):
        if record.get(key):
            provenance[key] = record[key]
    spacing = float(s["frame_ps"]) / 1000.0
    common = dict(name=run["protein"], replica=run["replica"], temperature_k=float(s["temperature_k"]),
                  forcefield="+".join(s.get("forcefield_files", [s["forcefield"]])))
    if first == 0:
        return read_backbone_trajectory(
            os.path.join(run["dir"], "traj.dcd"), os.path.join(run["dir"], "topology.pdb"),
            frame_spacing_ns=spacing, n_frames=run["frames"], provenance=provenance, **common)
    prefix = load_shard(os.path.join(run["dir"], "prefix.npz"))
    if prefix.n_frames != first:
        raise TrajectoryError(f"{run['dir']}/prefix.npz has {prefix.n_frames} frames but the run's DCD starts at "
                              f"frame {first}; delete the run directory and restore it again.")
    coords = prefix.coords_nm
    if run["frames"] > first:
        tail = read_backbone_trajectory(
            os.path.join(run["dir"], "traj.dcd"), os.path.join(run["dir"], "topology.pdb"),
            frame_spacing_ns=spacing, n_frames=run["frames"] - first, **common)
        if tail.sequence != prefix.sequence:
            raise TrajectoryError(f"{run['dir']}: the DCD's residues ({tail.sequence}) differ from prefix.npz's "
                                  f"({prefix.sequence}); delete the run directory and restore it again.")
        coords = np.concatenate([coords, tail.coords_nm], axis=0)
    provenance.update(trajectory=os.path.abspath(os.path.join(run["dir"], "traj.dcd")),
                      topology=os.path.abspath(os.path.join(run["dir"], "topology.pdb")), stride=1,
                      prefix_frames=first)
    from openmm_starmd.data import BackboneShard

    return BackboneShard(coords_nm=coords, frame_spacing_ns=spacing, sequence=prefix.sequence,
                         residue_index=prefix.residue_index, chain_index=prefix.chain_index,
                         chain_ids=prefix.chain_ids, residue_mask=prefix.residue_mask,
                         provenance=provenance, **common)


def build(md_root: str, out_dir: str, manifest_path: str, plan_path: str | None = None,
          atlas_dirs=(), min_frames: int = 2, log=print, state_root: str | None = None) -> dict:
    """(Re)build shards for every run with at least ``min_frames`` checkpointed frames.

    Shards of the old manifest whose run this machine does not have (a fresh clone) are kept
    as they are. With ``state_root``, every run's restart files at exactly its shard's last frame
    are exported there (``restore_md.export_state``), so a fresh clone resumes the MD exactly."""
    splits = _splits_from_plan(plan_path)
    os.makedirs(out_dir, exist_ok=True)
    old = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            old = {(e["protein"], e["replica"]): e for e in json.load(fh).get("shards", [])}
    base = os.path.dirname(os.path.abspath(manifest_path))
    entries = []

    def add(shard, source, complete):
        fname = f"{shard.name}_r{shard.replica}.npz"
        path = os.path.join(out_dir, fname)
        sha = save_shard(path, shard)
        entries.append(dict(protein=shard.name, replica=shard.replica, split=splits.get(shard.name, "train"),
                            file=os.path.relpath(path, base), residues=shard.n_residues, frames=shard.n_frames,
                            spacing_ns=float(shard.frame_spacing_ns), total_ns=round(shard.total_ns, 6),
                            sha256=sha, complete=complete, source=source))
        log(f"  wrote {fname}: {shard.n_residues} residues, {shard.n_frames} frames")

    seen = set()
    for run in find_runs(md_root):
        if run["frames"] < min_frames:
            continue
        key = (run["protein"], run["replica"])
        prev = old.get(key)
        if prev and prev["frames"] == run["frames"] and os.path.exists(os.path.join(base, prev["file"])):
            prev = dict(prev, split=splits.get(run["protein"], "train"), complete=run["complete"])
            entries.append(prev)
            seen.add(key)
        else:
            try:
                add(shard_from_run(run), os.path.relpath(run["dir"], base), run["complete"])
                seen.add(key)
            except TrajectoryError as exc:
                log(f"  skipped {run['protein']}/r{run['replica']}: {exc}")
                continue
        if state_root is not None:
            import restore_md

            state_dir = os.path.join(state_root, run["protein"], f"r{run['replica']}")
            restore_md.export_state(run["dir"], run["checkpoint_text"], state_dir)
            if splits.get(run["protein"]) == "test":  # the evaluation's all-atom thresholds need some
                restore_md.export_allatom_sample(run["dir"], run["checkpoint_text"], state_dir)
    for key, prev in old.items():
        # a shard whose MD is not on this machine (fresh clone, before restore_md.py) stays as it is
        if key not in seen and os.path.exists(os.path.join(base, prev["file"])) and prev.get("source", "").startswith(
                os.path.relpath(os.path.abspath(md_root), base)):
            entries.append(dict(prev, split=splits.get(prev["protein"], "train")))
            seen.add(key)
    for d in atlas_dirs:
        from openmm_starmd.data import read_atlas

        for xtc in sorted(glob.glob(os.path.join(d, "*_prod_R1_fit.xtc"))):
            name = os.path.basename(xtc)[: -len("_prod_R1_fit.xtc")]
            have = [k for k in (1, 2, 3) if os.path.exists(os.path.join(d, f"{name}_prod_R{k}_fit.xtc"))]
            for shard in read_atlas(d, name, replicas=have):
                add(shard, os.path.abspath(d), True)

    by_protein = {}
    for e in entries:
        by_protein.setdefault(e["protein"], set()).add(e["split"])
    mixed = [p for p, s in by_protein.items() if len(s) > 1]
    if mixed:
        raise ValueError(f"proteins {mixed} appear in several splits; a protein must belong to exactly one split.")
    manifest = {"format_version": FORMAT_VERSION, "created": _dt.datetime.now().isoformat(timespec="seconds"),
                "md_root": os.path.relpath(os.path.abspath(md_root), base),
                "shards": sorted(entries, key=lambda e: (e["split"], e["protein"], e["replica"]))}
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            previous = json.load(fh)
        if {k: v for k, v in previous.items() if k != "created"} == {k: v for k, v in manifest.items() if k != "created"}:
            # nothing changed: the file stays byte for byte (a release records the manifest's sha256)
            return previous
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(tmp, manifest_path)
    return manifest


def summary(manifest: dict, window: int = 2, min_window: int | None = None, base: str | None = None) -> str:
    """A text table of the data set and the Δt range it supports for windows of ``window`` frames
    (and of ``min_window`` frames, the shortest training examples, when given and smaller). With
    ``base`` (the manifest's folder) it also names the trajectories with reconstructed restarts."""
    rows = {}
    for e in manifest["shards"]:
        r = rows.setdefault(e["protein"], dict(split=e["split"], residues=e["residues"], replicas=0, ns=0.0,
                                                frames=0, spacing=set(), min_ns=np.inf))
        r["replicas"] += 1
        r["ns"] += e["total_ns"]
        r["frames"] += e["frames"]
        r["spacing"].add(e["spacing_ns"])
        r["min_ns"] = min(r["min_ns"], e["total_ns"])
    lines = [f"{'protein':20s} {'split':10s} {'res':>4s} {'rep':>3s} {'ns':>8s} {'frames':>7s}"]
    order = {"train": 0, "validation": 1, "test": 2}
    for name, r in sorted(rows.items(), key=lambda kv: (order.get(kv[1]["split"], 3), kv[1]["residues"], kv[0])):
        lines.append(f"{name:20s} {r['split']:10s} {r['residues']:4d} {r['replicas']:3d} {r['ns']:8.2f} {r['frames']:7d}")
    tot = {s: sum(1 for r in rows.values() if r["split"] == s) for s in ("train", "validation", "test")}
    ns = {s: sum(r["ns"] for r in rows.values() if r["split"] == s) for s in ("train", "validation", "test")}
    lines.append("proteins: " + ", ".join(f"{s} {tot[s]} ({ns[s]:.1f} ns)" for s in tot))
    if manifest["shards"]:
        spacing = min(e["spacing_ns"] for e in manifest["shards"])
        lengths = [max(window, 2)]
        if min_window is not None and 2 <= min_window < lengths[0]:
            lengths.append(min_window)
        for L in lengths:
            dt_max = [e["spacing_ns"] * ((e["frames"] - 1) // (L - 1)) for e in manifest["shards"]
                      if e["frames"] >= L]
            if dt_max:
                lines.append(f"Δt covered for windows of L={L}: {spacing:g} ns to {max(dt_max):g} ns "
                             f"(median trajectory up to {float(np.median(dt_max)):g} ns); "
                             "STAR-MD samples LogUniform[0.01, 10] ns")
            else:
                lines.append(f"no trajectory has {L} frames yet")
        short = [n for n, r in rows.items() if r["split"] == "test" and r["replicas"] < 2]
        if short:
            lines.append(f"test proteins with fewer than 2 replicas: {', '.join(short)}")
        if base is not None:
            restarted = []
            for e in manifest["shards"]:
                frames = [r["frame"] for r in load_shard(os.path.join(base, e["file"])).provenance.get("restarts", [])]
                if frames:
                    restarted.append(f"{e['protein']}/r{e['replica']} (frame {', '.join(map(str, frames))})")
            if restarted:
                lines.append(f"{len(restarted)} trajectories have a reconstructed restart (training/restore_md.py; "
                             f"training windows below 1 ns never span it): {'; '.join(restarted)}")
        lines.append(floor_line(floor_status(manifest)))
    return "\n".join(lines)


#: The data floor before the first default model is trained (the data issue): at least 10 real
#: proteins of 10-70 residues at 10 ps frames, every trajectory at least 4 ns (so 1-ns strides fill
#: a window of 4 frames), among them 3 test proteins with 2 independent replicas each.
FLOOR = dict(proteins=10, min_residues=10, max_residues=70, spacing_ns=0.01, min_ns=4.0, test_proteins=3,
             test_replicas=2)


def floor_status(manifest: dict, floor: dict | None = None) -> dict:
    """How far the manifest's data is from the floor (:data:`FLOOR`).

    A protein *counts* when its residues are in range, every shard of it has the floor's frame
    spacing and at least ``min_ns`` ns, and (test proteins) it has ``test_replicas`` replicas.

    Returns
    -------
    dict
        ``met`` (bool); ``counted`` (names of proteins that count); ``test_counted``; ``missing_ns``,
        the least MD still to run to meet the floor: the ``test_proteins`` test proteins closest to
        counting (short trajectories to ``min_ns``, missing replicas from scratch) plus the other
        proteins closest to counting, up to ``proteins``, where a protein not in the manifest
        costs ``min_ns`` per replica it needs (proteins beyond the floor's number cost nothing);
        ``problems``: proteins that cannot count as they are (residues or spacing), with the reason.
    """
    f = dict(FLOOR, **(floor or {}))
    tol = 1e-6
    by_protein: dict[str, list] = {}
    for e in manifest["shards"]:
        by_protein.setdefault(e["protein"], []).append(e)
    counted, test_counted, problems = [], [], {}
    short_test, short_other = [], []
    for name, shards in sorted(by_protein.items()):
        split = shards[0]["split"]
        res = shards[0]["residues"]
        if not f["min_residues"] <= res <= f["max_residues"]:
            problems[name] = f"{res} residues, outside {f['min_residues']}-{f['max_residues']}"
            continue
        if any(abs(e["spacing_ns"] - f["spacing_ns"]) > tol for e in shards):
            problems[name] = f"frame spacing {sorted({e['spacing_ns'] for e in shards})} ns, not {f['spacing_ns']:g} ns"
            continue
        need = f["test_replicas"] if split == "test" else 1
        short = sum(max(0.0, f["min_ns"] - e["total_ns"]) for e in shards)
        short += max(0, need - len(shards)) * f["min_ns"]
        (short_test if split == "test" else short_other).append(short)
        if short <= tol:
            counted.append(name)
            if split == "test":
                test_counted.append(name)
    # cheapest way there: the test proteins closest to counting (new ones from scratch), then
    # the closest of all the rest (new ones at min_ns each)
    # (a real test protein never costs more than a new one, test_replicas * min_ns)
    short_test = sorted(short_test)
    chosen = (short_test + [f["test_replicas"] * f["min_ns"]] * f["test_proteins"])[:f["test_proteins"]]
    rest = sorted(short_test[f["test_proteins"]:] + short_other + [f["min_ns"]] * f["proteins"])
    missing = float(sum(chosen) + sum(rest[:max(0, f["proteins"] - f["test_proteins"])]))
    met = len(counted) >= f["proteins"] and len(test_counted) >= f["test_proteins"]
    return {"met": met, "counted": counted, "test_counted": test_counted, "missing_ns": missing,
            "problems": problems, "floor": f}


def floor_line(status: dict) -> str:
    """One line for the summary."""
    f = status["floor"]
    head = (f"floor ({f['proteins']} proteins of {f['min_residues']}-{f['max_residues']} residues, every trajectory "
            f">= {f['min_ns']:g} ns at {f['spacing_ns'] * 1000:g} ps, {f['test_proteins']} test proteins x "
            f"{f['test_replicas']} replicas): ")
    if status["met"]:
        return head + f"MET ({len(status['counted'])} proteins count)"
    text = (head + f"not met: {len(status['counted'])} of {f['proteins']} proteins count, "
            f"{len(status['test_counted'])} of {f['test_proteins']} test proteins; about "
            f"{status['missing_ns']:.1f} ns of MD to go")
    for name, why in status["problems"].items():
        text += f"\n  {name} cannot count: {why}"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--md-root", default=os.path.join(HERE, "md"), help="root of simulate.py runs")
    p.add_argument("--out", default=os.path.join(HERE, "data", "shards"), help="shard directory")
    p.add_argument("--manifest", default=os.path.join(HERE, "data", "manifest.json"))
    p.add_argument("--plan", default=os.path.join(HERE, "plan.json"), help="plan with the protein splits")
    p.add_argument("--atlas", action="append", default=[], help="ATLAS folder to add (repeatable)")
    p.add_argument("--min-frames", type=int, default=2, help="skip runs with fewer checkpointed frames")
    p.add_argument("--summary", action="store_true", help="print the data table (after building unless --no-build)")
    p.add_argument("--no-build", action="store_true", help="only print the summary of the existing manifest")
    p.add_argument("--window", type=int, default=8, help="window length L used for the Δt range in --summary")
    p.add_argument("--min-window", type=int, default=4,
                   help="shortest training window (train.py --min-window), also shown in --summary")
    p.add_argument("--state-root", default=None,
                   help="where to export each run's restart files at its shard's last frame (committed, so a "
                        "fresh clone resumes the MD exactly; training/restore_md.py); default training/md_state "
                        "when --md-root is the default, else none")
    p.add_argument("--verify", action="store_true", help="load every shard and check its sha256")
    p.add_argument("--check-floor", action="store_true",
                   help="exit with status 3 unless the data meets the floor (FLOOR: 10 proteins x 4 ns, 3 test "
                        "proteins x 2 replicas); prints how far it is")
    args = p.parse_args(argv)
    if args.no_build:
        with open(args.manifest) as fh:
            manifest = json.load(fh)
    else:
        state_root = args.state_root
        if state_root is None and os.path.abspath(args.md_root) == os.path.join(HERE, "md"):
            state_root = os.path.join(HERE, "md_state")
        manifest = build(args.md_root, args.out, args.manifest, args.plan, args.atlas, args.min_frames,
                         state_root=state_root)
    if args.verify:
        base = os.path.dirname(os.path.abspath(args.manifest))
        for e in manifest["shards"]:
            load_shard(os.path.join(base, e["file"]), sha256=e["sha256"])
        print(f"verified {len(manifest['shards'])} shards")
    if args.summary:
        print(summary(manifest, args.window, args.min_window, os.path.dirname(os.path.abspath(args.manifest))))
    if args.check_floor:
        status = floor_status(manifest)
        if not args.summary:
            print(floor_line(status))
        return 0 if status["met"] else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
