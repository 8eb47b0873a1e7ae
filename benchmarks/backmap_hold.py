#!/usr/bin/env python
"""How the backmapper holds the generated Cα: harmonic restraints (default, with the fixed-Cα
repair of frames whose Cα trace they break) vs stiffer restraints vs fixed atoms.

For each protein the bundled model generates ``--frames`` frames at ``--dt-ns`` through the
StarMDIntegrator (Cα projection on, the default) on an amber14 + GBn2 System, once per backmap
setting, with the same seed, so every setting backmaps the same generated frames (the model's
history is its own frames, never the backmapped atoms). Per setting it prints, over the frames:
the largest distance of a backmapped Cα from its generated position (median and max over frames),
frames whose backmapped Cα trace has a break (consecutive Cα > 4.19 Å), the longest peptide
C–N bond (median, max, and frames > 1.40 Å, the all-atom validity cut), the potential energy
under the full System, and the time per frame (generation and backmap).

    OMP_NUM_THREADS=1 python benchmarks/backmap_hold.py --proteins 2M9I villin_hp35 crambin_1ejg
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STRUCTURES = os.path.join(HERE, "..", "training", "structures")

SETTINGS = {
    "restrain k=1e5, no repair": {"hold": "restrain", "restraint_k": 1e5, "repair_ca": False},
    "restrain k=1e5 + repair (default)": {"hold": "restrain", "restraint_k": 1e5},
    "restrain k=1e6": {"hold": "restrain", "restraint_k": 1e6, "repair_ca": False},
    "fix": {"hold": "fix"},
}


def run_one(pdb_path: str, frames: int, dt_ns: float, options: dict, seed: int) -> dict:
    import openmm
    import openmm.unit as u
    from openmm.app import ForceField, Simulation

    from openmm_starmd import StarMDIntegrator, prepare_protein

    pdb = prepare_protein(pdb_path, replace_nonstandard=True)
    system = ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(pdb.topology)
    integ = StarMDIntegrator(dt=dt_ns * u.nanoseconds, seed=seed, backmap_options=options)
    sim = Simulation(pdb.topology, system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    sim.context.setPositions(pdb.positions)
    ca = np.array([a.index for a in pdb.topology.atoms() if a.name == "CA"])
    res = list(pdb.topology.residues())
    cn = np.array([(next(a.index for a in r1.atoms() if a.name == "C"), next(a.index for a in r2.atoms() if a.name == "N"))
                   for r1, r2 in zip(res[:-1], res[1:]) if r1.chain == r2.chain])
    dev, cn_max, energy, breaks, t_frame = [], [], [], 0, 0.0
    for _ in range(frames):
        t0 = time.perf_counter()
        sim.step(1)  # generates one frame and, with no reporter to say otherwise, backmaps it
        st = sim.context.getState(getPositions=True, getEnergy=True)
        t_frame += time.perf_counter() - t0
        x = st.getPositions(asNumpy=True).value_in_unit(u.nanometer)
        gen = integ.recent_ca_nm(1)[0]
        dev.append(np.linalg.norm(x[ca] - gen, axis=-1).max() * 10)
        cn_max.append(np.linalg.norm(x[cn[:, 0]] - x[cn[:, 1]], axis=-1).max() * 10)
        energy.append(st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))
        breaks += int(np.linalg.norm(x[ca][1:] - x[ca][:-1], axis=-1).max() > 0.419)
    dev, cn_max, energy = map(np.asarray, (dev, cn_max, energy))
    return dict(dev_med=np.median(dev), dev_max=dev.max(), breaks=breaks, cn_med=np.median(cn_max), cn_max=cn_max.max(),
                cn_bad=int((cn_max > 1.40).sum()), e_med=np.median(energy), e_max=energy.max(),
                s_per_frame=t_frame / frames, repaired=integ.ca_repaired_frames)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proteins", nargs="+", default=["2M9I", "villin_hp35", "crambin_1ejg"])
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--dt-ns", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from tqdm import tqdm

    rows = []
    jobs = [(prot, name) for prot in args.proteins for name in SETTINGS]
    for prot, name in tqdm(jobs, desc="protein x setting", file=sys.stderr):
        r = run_one(os.path.join(STRUCTURES, f"{prot}.pdb"), args.frames, args.dt_ns, SETTINGS[name], args.seed)
        rows.append((prot, name, r))
    print(f"{args.frames} frames at Δt {args.dt_ns:g} ns per protein and setting; Cα projection on; amber14 + GBn2; 1 thread")
    print("| protein | hold | Cα from generated, median / max (Å) | Cα-break frames | longest C–N, median / max (Å) | "
          "frames C–N > 1.40 Å | energy median / max (kJ/mol) | s per frame (generate + backmap) | frames repaired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prot, name, r in rows:
        print(f"| {prot} | {name} | {r['dev_med']:.3f} / {r['dev_max']:.3f} | {r['breaks']} | {r['cn_med']:.3f} / "
              f"{r['cn_max']:.3f} | {r['cn_bad']} | {r['e_med']:.0f} / {r['e_max']:.0f} | {r['s_per_frame']:.2f} | "
              f"{r['repaired']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
