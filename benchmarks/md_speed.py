#!/usr/bin/env python
"""How fast is the reference MD? ns/day for three protein sizes and two implicit-solvent models.

This is the number that decides how much training data we can make (training/simulate.py) and
what STAR-MD's speed-up over MD is measured against. Each case: prepare the structure, build the
System exactly as ``training/simulate.py`` does (HBonds, HMR 1.5 amu, 4 fs, LangevinMiddle,
300 K), minimise briefly, warm up, then time ``--steps`` steps.

    python benchmarks/md_speed.py                 # short version (~1 min on one CPU thread)
    python benchmarks/md_speed.py --steps 5000    # long version: don't run it next to the
                                                  # background MD generator on a 2-core machine

Defaults: 2M9I (34 residues), 1ENH (48) and ubiquitin 1UBI (76) from training/structures;
force fields ``amber99-obc`` (amber99sbildn + OBC GBSA, the default) and ``gbn2`` (amber14 +
GBn2, a CustomGBForce), at the simulate.py default cutoff; ``--cutoffs 0 1.2`` adds no-cutoff rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import openmm as mm
import openmm.app as app
import openmm.unit as u

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "training"))

import simulate  # noqa: E402

from openmm_starmd.prepare import prepare_protein  # noqa: E402

DEFAULT_PROTEINS = ["2M9I.pdb", "1ENH.pdb", "ubiquitin_1ubi.pdb"]


def ns_per_day(pdb: str, forcefield: str, cutoff_nm: float, steps: int, platform: str, threads: int,
               step_fs: float = 4.0) -> tuple[int, int, float]:
    """Return (residues, atoms, ns/day) of one configuration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_protein(pdb)
    system, topology, positions = simulate.build_system(
        prepared.topology, prepared.positions, forcefield, cutoff_nm, 1.5, 1.0, 0.15, 300.0)
    integrator = mm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, step_fs * u.femtosecond)
    plat, props = simulate.choose_platform(platform, threads)
    sim = app.Simulation(topology, system, integrator, plat, props)
    sim.context.setPositions(positions)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    sim.step(max(50, steps // 10))  # warm-up: kernels, neighbour lists
    t0 = time.perf_counter()
    sim.step(steps)
    elapsed = time.perf_counter() - t0
    return prepared.n_residues, topology.getNumAtoms(), steps * step_fs * 1e-6 / elapsed * 86400.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--proteins", nargs="+", default=DEFAULT_PROTEINS, help="files in training/structures or paths")
    p.add_argument("--forcefields", nargs="+", default=["amber99-obc", "gbn2"], choices=sorted(simulate.FORCEFIELDS))
    p.add_argument("--cutoffs", nargs="+", type=float, default=[1.2], help="implicit-solvent cutoffs (nm), 0 = none")
    p.add_argument("--steps", type=int, default=500, help="timed steps per case (4 fs each)")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(f"OpenMM {mm.__version__}, platform {args.platform}, threads {args.threads}, {args.steps} timed steps of 4 fs")
    print(f"{'protein':22s} {'res':>4s} {'atoms':>6s} {'forcefield':12s} {'cutoff':>7s} {'ns/day':>8s}")
    for name in args.proteins:
        path = name if os.path.exists(name) else os.path.join(REPO, "training", "structures", name)
        for ff in args.forcefields:
            for cut in args.cutoffs:
                res, atoms, rate = ns_per_day(path, ff, cut, args.steps, args.platform, args.threads)
                label = "none" if cut <= 0 else f"{cut:g} nm"
                print(f"{os.path.basename(path):22s} {res:4d} {atoms:6d} {ff:12s} {label:>7s} {rate:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
