"""STAR-MD generation vs OpenMM MD on the same machine, same protein, in one run: ns/day and ratios.

For each protein: OpenMM MD (LangevinMiddle, 4 fs with HMR 1.5 amu, HBonds, CPU platform or CUDA
when present) with amber14 + GBn2 and with amber99sbildn + OBC, timed over ``--md-steps`` steps
after a short warm-up; then STAR-MD through StarMDIntegrator in a plain Simulation (bundled model
and its default steps, dt = 1 ns, DCD + StateDataReporter every 10 frames so all-atom backmapping
happens every 10 ns), timed over ``--frames`` frames. Prints ns/day and STAR-MD / MD ratios.

    python benchmarks/speed_vs_md.py                    # 20, 34, 56 and 167 residues
    python benchmarks/speed_vs_md.py --proteins 2M9I --md-steps 200 --frames 20
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import openmm
from openmm import app, unit

from openmm_starmd import StarMDIntegrator, prepare_protein

STRUCTURES = Path(__file__).resolve().parents[1] / "training" / "structures"
FORCEFIELDS = {"gbn2": ("amber14-all.xml", "implicit/gbn2.xml"), "obc": ("amber99sbildn.xml", "amber99_obc.xml")}


def md_ns_per_day(prepared, ff: str, steps: int, platform: str, threads: int | None) -> float:
    system = app.ForceField(*FORCEFIELDS[ff]).createSystem(
        prepared.topology, nonbondedMethod=app.CutoffNonPeriodic, nonbondedCutoff=1.2 * unit.nanometer,
        constraints=app.HBonds, hydrogenMass=1.5 * unit.amu)
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 4 * unit.femtoseconds)
    props = {"Threads": str(threads)} if (platform == "CPU" and threads) else {}
    sim = app.Simulation(prepared.topology, system, integ, openmm.Platform.getPlatformByName(platform), props)
    sim.context.setPositions(prepared.positions)
    sim.minimizeEnergy(maxIterations=100)
    sim.step(20)
    start = time.perf_counter()
    sim.step(steps)
    sim.context.getState(getEnergy=True)  # wait for the device
    wall = time.perf_counter() - start
    return steps * 4e-6 / wall * 86400


def starmd_ns_per_day(prepared, frames: int, every: int) -> tuple[float, str]:
    system = app.ForceField(*FORCEFIELDS["gbn2"]).createSystem(prepared.topology)
    integ = StarMDIntegrator(dt=1 * unit.nanoseconds, seed=0)
    sim = app.Simulation(prepared.topology, system, integ)
    sim.context.setPositions(prepared.positions)
    with tempfile.TemporaryDirectory() as tmp:
        sim.reporters += [app.DCDReporter(os.path.join(tmp, "t.dcd"), every),
                          app.StateDataReporter(os.path.join(tmp, "l.csv"), every, time=True, potentialEnergy=True)]
        sim.step(1)  # model load, cache set-up, first backmap context
        start = time.perf_counter()
        sim.step(frames)
        wall = time.perf_counter() - start
    return frames * 1.0 / wall * 86400, integ.device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proteins", nargs="+", default=["trpcage_2JOF", "2M9I", "1EM7_L7A", "3gfsA"])
    p.add_argument("--md-steps", type=int, default=500, help="timed MD steps (4 fs) per force field")
    p.add_argument("--frames", type=int, default=40, help="timed STAR-MD frames (1 ns each)")
    p.add_argument("--report-every", type=int, default=10, help="all-atom frame every N STAR-MD frames")
    p.add_argument("--platform", default="CUDA" if "CUDA" in [openmm.Platform.getPlatform(i).getName()
                   for i in range(openmm.Platform.getNumPlatforms())] else "CPU")
    p.add_argument("--threads", type=int, default=None, help="OpenMM CPU threads (default: OpenMM's)")
    a = p.parse_args(argv)
    print(f"| protein | residues | MD GBn2 ns/day | MD OBC ns/day | STAR-MD ns/day ({a.platform} MD) | vs GBn2 | vs OBC |")
    print("|---|---|---|---|---|---|---|")
    for name in a.proteins:
        path = next(STRUCTURES.glob(f"{name}.*"))
        prepared = prepare_protein(path)
        n_res = prepared.topology.getNumResidues()
        gbn2 = md_ns_per_day(prepared, "gbn2", a.md_steps, a.platform, a.threads)
        obc = md_ns_per_day(prepared, "obc", a.md_steps, a.platform, a.threads)
        gen, device = starmd_ns_per_day(prepared, a.frames, a.report_every)
        print(f"| {name} | {n_res} | {gbn2:.3g} | {obc:.3g} | {gen:.3g} (torch {device}) | "
              f"{gen / gbn2:.3g} | {gen / obc:.3g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
