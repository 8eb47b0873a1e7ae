#!/usr/bin/env python
"""What the backmap's minimisation does to all-atom validity: settings side by side on the same frames.

For each protein (default: the test proteins) the bundled model generates ``--frames`` frames at
``--dt-ns`` once (the sampler and Cα projection of benchmarks/long_horizon.py, same seed), and each
backmap setting turns every one of them into all atoms, chained from its own previous all-atom
frame as the integrator does. Every backmapped frame is scored with the all-atom criteria fitted
on the protein's reference MD (99th percentiles, `fit_allatom_criteria`, as `starmd evaluate`):
fraction of frames passing each check (peptide bonds, clashscore, Ramachandran and rotamer
outliers) and all of them, the median clashscore and outlier fractions against their limits, the
median potential energy under the full System (amber14 + GBn2), and seconds per backmapped frame.

    OMP_NUM_THREADS=1 python benchmarks/backmap_validity.py                      # 3 test proteins, 60 frames
    OMP_NUM_THREADS=1 python benchmarks/backmap_validity.py --proteins 2M9I --frames 20 --settings vacuum system
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import long_horizon as lh  # noqa: E402  (its protein set-up, criteria and sampler)

from openmm_starmd.analysis.stereochemistry import allatom_validity  # noqa: E402
from openmm_starmd.backmap import Backmapper  # noqa: E402
from openmm_starmd.checkpoints import load_model  # noqa: E402

#: name -> Backmapper options (the integrator's defaults apart from these)
SETTINGS = {
    "vacuum": {"dielectric": 1.0},
    "default": {},
    "vacuum-eps4": {"dielectric": 4.0},
    "vacuum-eps16": {"dielectric": 16.0},
    "vacuum-eps80": {"dielectric": 80.0},
    "vacuum-eps16-side-chains": {"dielectric": 16.0, "screen": "side_chains"},
    "system": {"mode": "system"},
}


def generate_frames(setup, loaded, args, n: int) -> list:
    """``n`` generated frames (float64 Rigid each) from the prepared start."""
    sampler = lh.make_sampler(loaded, setup, args)
    start = setup.frames_of(setup.positions_nm)
    sampler.add_history(lh.Rigid(start.rots.float(), start.trans.float()))
    with torch.no_grad():
        out = sampler.generate(n)
    return [lh.Rigid(out.rots[0, i].double().cpu(), out.trans[0, i].double().cpu()) for i in range(n)]


def run_setting(setup, frames: list, options: dict, platform, props) -> dict:
    """Backmap every frame in turn with one setting; score the all-atom frames."""
    kw = {"mode": "vacuum", **options}
    bm = Backmapper(setup.system, setup.backmapper.atom_residue, setup.backbone_atoms,
                    platform=platform, platform_properties=props, **kw)
    x, xs, energy = setup.positions_nm.copy(), [], []
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        res = bm.backmap(x, setup.frames_of(x), f, frame_index=i, compute_energy=True)
        x = res.positions_nm
        xs.append(x.astype(np.float32))
        energy.append(res.potential_energy_kj)
    seconds = (time.perf_counter() - t0) / len(frames)
    v = allatom_validity(md.Trajectory(np.stack(xs), setup.top_aa), setup.criteria)
    c = setup.criteria
    return {"valid": float(v.valid.mean()), "peptide_ok": float(v.peptide_ok.mean()),
            "clash_ok": float(v.clash_ok.mean()), "rama_ok": float(v.rama_ok.mean()),
            "rotamer_ok": float(v.rotamer_ok.mean()),
            "clashscore_median": float(np.median(v.clashscore)), "clashscore_max_allowed": float(c.max_clashscore),
            "rama_median": float(np.median(v.rama_fraction)), "rama_max_allowed": float(c.max_rama_fraction),
            "rotamer_median": float(np.median(v.rotamer_fraction)), "rotamer_max_allowed": float(c.max_rotamer_fraction),
            "energy_median_kj_mol": float(np.median(energy)), "s_per_frame": seconds,
            "strained_frames": int(bm.strained_frames), "ca_repaired_frames": int(bm.ca_repaired_frames)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proteins", nargs="+", default=None, help="default: the test proteins (as long_horizon.py)")
    p.add_argument("--frames", type=int, default=60, help="generated frames per protein (default 60)")
    p.add_argument("--dt-ns", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+", default=["vacuum", "vacuum-eps4", "vacuum-eps16", "vacuum-eps80"],
                   choices=sorted(SETTINGS), help="backmap settings to compare (default: all but the slow 'system')")
    p.add_argument("--md-root", default=None, help="root of the reference MD runs (default: training/md)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lh_args = lh.build_parser().parse_args(["--dt-ns", str(a.dt_ns), "--seed", str(a.seed)]
                                           + (["--md-root", a.md_root] if a.md_root else []))
    with open(lh_args.plan) as fh:
        lh_args.plan_data = json.load(fh)
    lh_args.torch_device = "cpu"
    proteins = a.proteins or lh.default_proteins(lh_args.plan_data, Path(lh_args.manifest))
    platform, props = lh.pick_platform("CPU", 1)
    loaded = load_model(None, device="cpu")
    from tqdm.auto import tqdm

    rows = []
    for name in proteins:
        setup = lh.ProteinSetup(name, lh_args, platform, props)
        frames = generate_frames(setup, loaded, lh_args, a.frames)
        for s in tqdm(a.settings, desc=name, file=sys.stderr):
            rows.append({"protein": name, "setting": s, **run_setting(setup, frames, SETTINGS[s], platform, props)})
    print(f"bundled model, {a.frames} frames at Δt {a.dt_ns:g} ns per protein (Cα projection on), every frame "
          "backmapped; criteria = 99th percentiles of each protein's reference MD; energy under amber14 + GBn2; 1 thread")
    print("| protein | setting | valid | peptide ok | clash ok (median / limit) | Rama ok (median / limit) | "
          "rotamer ok (median / limit) | energy median (kJ/mol) | s / frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protein']} | {r['setting']} | {r['valid']:.2f} | {r['peptide_ok']:.2f} | {r['clash_ok']:.2f} "
              f"({r['clashscore_median']:.1f} / {r['clashscore_max_allowed']:.1f}) | {r['rama_ok']:.2f} "
              f"({r['rama_median']:.3f} / {r['rama_max_allowed']:.3f}) | {r['rotamer_ok']:.2f} "
              f"({r['rotamer_median']:.3f} / {r['rotamer_max_allowed']:.3f}) | {r['energy_median_kj_mol']:.0f} | "
              f"{r['s_per_frame']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
