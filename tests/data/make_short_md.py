"""Write tests/data/short_md_1enh.npz: a few ps of real OpenMM MD of the engrailed homeodomain.

The model tests overfit a small STAR-MD network to this one short trajectory, so it must be real
dynamics of a real protein but tiny: backbone N, CA, C, O only, float32, < 1 MB.

Protocol: tests/data/engrailed_1enh.pdb (1ENH from bioemu-benchmarks, see tests/data/README.md)
prepared with ``openmm_starmd.prepare.prepare_protein`` (PDBFixer: hydrogens rebuilt at pH 7;
falls back to PDBFixer inline if that module is unavailable), Amber ff99SB-ILDN with OBC implicit
solvent (amber99sbildn.xml + amber99_obc.xml), no cutoff, HBonds constraints, energy
minimisation, Langevin middle integrator at 300 K, friction 1/ps, 2 fs, fixed seed; 2 ps of
equilibration, then 100 frames every 0.05 ps (5 ps). The CPU platform on one thread.

Run from the repository root:  python tests/data/make_short_md.py
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

HERE = Path(__file__).parent
PDB = HERE / "engrailed_1enh.pdb"
OUT = HERE / "short_md_1enh.npz"

TEMPERATURE_K = 300.0
FRICTION_PER_PS = 1.0
STEP_FS = 2.0
EQUILIBRATION_STEPS = 1000  # 2 ps
STEPS_PER_FRAME = 25  # 0.05 ps
N_FRAMES = 100
SEED = 2026
AA3 = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "HID": "H", "HIE": "H", "HIP": "H", "CYX": "C",
}


def _prepare():
    try:
        from openmm_starmd.prepare import prepare_protein
    except ImportError:
        prepare_protein = None
    if prepare_protein is not None:
        prepared = prepare_protein(PDB)
        return prepared.topology, prepared.positions, "openmm_starmd.prepare.prepare_protein (pH 7)"
    from pdbfixer import PDBFixer

    fixer = PDBFixer(filename=str(PDB))
    fixer.removeHeterogens(keepWater=False)
    fixer.findMissingResidues()
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    fixer.addMissingAtoms(seed=0)
    fixer.addMissingHydrogens(7.0)
    return fixer.topology, fixer.positions, "PDBFixer inline (pH 7)"


def main() -> int:
    topology, positions, how = _prepare()
    forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    integrator = openmm.LangevinMiddleIntegrator(
        TEMPERATURE_K * unit.kelvin, FRICTION_PER_PS / unit.picosecond, STEP_FS * unit.femtosecond
    )
    integrator.setRandomNumberSeed(SEED)
    platform = openmm.Platform.getPlatformByName("CPU")
    simulation = app.Simulation(topology, system, integrator, platform, {"Threads": "1"})
    simulation.context.setPositions(positions)
    simulation.minimizeEnergy(maxIterations=500)
    simulation.context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, SEED)
    start = time.time()
    simulation.step(EQUILIBRATION_STEPS)

    residues = [r for r in topology.residues() if r.name in AA3]
    index = {(r.index, a.name): a.index for r in residues for a in r.atoms()}
    atoms = np.array([[index[(r.index, name)] for name in ("N", "CA", "C", "O")] for r in residues])
    frames = []
    for _ in range(N_FRAMES):
        simulation.step(STEPS_PER_FRAME)
        xyz = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        frames.append(xyz[atoms])
    backbone = np.asarray(frames, dtype=np.float32)  # (F, N, 4, 3) nm

    provenance = {
        "structure": "tests/data/engrailed_1enh.pdb (1ENH, bioemu-benchmarks 0.0.2.post1)",
        "structure_sha256": hashlib.sha256(PDB.read_bytes()).hexdigest(),
        "preparation": how,
        "force_field": "amber99sbildn.xml + amber99_obc.xml (OBC implicit solvent), NoCutoff, HBonds",
        "integrator": f"LangevinMiddleIntegrator {TEMPERATURE_K} K, {FRICTION_PER_PS}/ps, {STEP_FS} fs, seed {SEED}",
        "equilibration_ps": EQUILIBRATION_STEPS * STEP_FS / 1000,
        "frame_spacing_ps": STEPS_PER_FRAME * STEP_FS / 1000,
        "n_frames": N_FRAMES,
        "openmm_version": openmm.__version__,
        "platform": "CPU, 1 thread",
        "script": "tests/data/make_short_md.py",
        "wall_time_s": round(time.time() - start, 1),
    }
    np.savez_compressed(
        OUT,
        backbone_nm=backbone,
        atom_names=np.array(["N", "CA", "C", "O"]),
        sequence=np.array("".join(AA3[r.name] for r in residues)),
        residue_index=np.array([int(r.id) for r in residues], dtype=np.int64),
        chain_index=np.array([r.chain.index for r in residues], dtype=np.int64),
        frame_spacing_ns=np.float64(STEPS_PER_FRAME * STEP_FS * 1e-6),
        provenance=np.array(json.dumps(provenance)),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {backbone.shape} backbone, {provenance['wall_time_s']} s of MD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
