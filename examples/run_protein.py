"""Generate protein dynamics with STAR-MD in a plain OpenMM script.

The script below is the one from the README: the only STAR-MD line is the integrator. It runs the
bundled default model on a real protein the model never saw in training (2M9I, a 34-residue WW
domain from bioemu-benchmarks, see training/structures/structures.json), writes an all-atom DCD and
a CSV log, then reads the DCD back with mdtraj and plots Cα RMSD and RMSF (examples/analyze_trajectory.py).

    python examples/run_protein.py                       # 200 ns at dt = 1 ns, a frame every 10 ns
    python examples/run_protein.py --steps 1000          # 1 microsecond
    python examples/run_protein.py --pdb my.pdb --out my_run/
"""
import argparse
import sys
import time
from pathlib import Path

from openmm.app import DCDReporter, ForceField, Simulation, StateDataReporter
from openmm.unit import kelvin, nanoseconds

from openmm_starmd import StarMDIntegrator, prepare_protein

HERE = Path(__file__).resolve().parent
DEFAULT_PDB = HERE.parent / "training" / "structures" / "2M9I.pdb"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdb", default=str(DEFAULT_PDB), help="input structure (PDB/mmCIF)")
    parser.add_argument("--steps", type=int, default=200, help="frames to generate (default 200)")
    parser.add_argument("--dt-ns", type=float, default=1.0, help="time per frame in ns (default 1)")
    parser.add_argument("--report-every", type=int, default=10, help="write an all-atom frame every N steps")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # --- the user's OpenMM script -------------------------------------------------------------
    pdb = prepare_protein(args.pdb)  # PDBFixer: heterogens/water out, missing atoms and H in
    pdb.write_pdb(out / "prepared.pdb")
    system = ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(pdb.topology)
    integrator = StarMDIntegrator(dt=args.dt_ns * nanoseconds, seed=args.seed, temperature=300 * kelvin)
    sim = Simulation(pdb.topology, system, integrator)
    sim.context.setPositions(pdb.positions)
    sim.reporters += [
        DCDReporter(str(out / "traj.dcd"), args.report_every),
        StateDataReporter(str(out / "log.csv"), args.report_every, step=True, time=True,
                          potentialEnergy=True, speed=True),
        StateDataReporter(sys.stdout, args.report_every, step=True, time=True, potentialEnergy=True,
                          speed=True, progress=True, remainingTime=True, totalSteps=args.steps),
    ]
    start = time.perf_counter()
    sim.step(args.steps)
    wall = time.perf_counter() - start
    # ------------------------------------------------------------------------------------------

    simulated_ns = args.steps * args.dt_ns
    print(f"\nGenerated {args.steps} frames ({simulated_ns:g} ns) of {pdb.topology.getNumResidues()} residues "
          f"in {wall:.1f} s on {integrator.device}: {simulated_ns / wall * 86400:.3g} ns/day.")
    print(f"Wrote {out / 'prepared.pdb'}, {out / 'traj.dcd'} ({args.steps // args.report_every} all-atom frames), "
          f"{out / 'log.csv'}.")
    cp = integrator.ca_projection
    print(f"Cα projection (keep_ca_geometry, default): moved {cp['moved']} of {cp['frames']} generated frames back "
          f"into the bounds MD keeps (largest residue move {cp['max_move_nm'] * 10:.2f} Å).")
    if integrator.ca_repaired_frames:
        print(f"{integrator.ca_repaired_frames} all-atom frame(s) re-minimised with Cα fixed: the restrained "
              "minimisation had broken the generated Cα trace.")
    if integrator.strained_frames:
        print(f"{integrator.strained_frames} all-atom frame(s) strained beyond repair (see the BackmapWarning above).")

    from openmm_starmd import load_model

    meta = load_model().metadata
    print(f"Model: bundled default, {meta.get('steps')} training steps on {meta.get('train_proteins') or 'see card'}; "
          "read openmm_starmd/data/MODEL_CARD.md for what it can and cannot do.")

    from analyze_trajectory import analyze  # examples/analyze_trajectory.py

    analyze(out / "traj.dcd", out / "prepared.pdb", out, dt_ns=args.dt_ns * args.report_every)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
