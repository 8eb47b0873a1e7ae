"""Shared fixtures for the evaluation-library tests: a real protein and two short real MD runs.

The protein is crambin (1EJG, 46 residues, 3 disulfides; the ``crambin_pdb`` fixture of
tests/conftest.py), prepared with PDBFixer. The two MD replicas are simulated
once per session with OpenMM (amber99sbildn + amber99_obc implicit solvent, 4 fs with heavy
hydrogens; 40 frames 12 fs apart) and written as DCD files, so the tests read real
trajectories through real files.
"""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

MD_FRAMES = 40
MD_STEPS_PER_FRAME = 3
MD_STEP_FS = 4.0
MD_DT_NS = MD_STEPS_PER_FRAME * MD_STEP_FS * 1e-6


@pytest.fixture(autouse=True)
def _single_threaded_blas():
    """Run each test with one BLAS thread, restoring the setting afterwards.

    On the 2-core shared test machines a multithreaded BLAS busy-waits on the small matrices
    these tests use (a 4000 x 138 SVD took seconds instead of 0.05 s).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def prepared_pdb(crambin_pdb, tmp_path_factory) -> Path:
    """Crambin (1EJG), heterogens removed, missing atoms and hydrogens added (PDBFixer)."""
    from openmm.app import PDBFile
    from pdbfixer import PDBFixer

    fixer = PDBFixer(filename=str(crambin_pdb))
    fixer.removeHeterogens(keepWater=False)
    fixer.findMissingResidues()
    fixer.missingResidues = {}  # keep the deposited chain; gaps are tested separately
    fixer.findNonstandardResidues()
    fixer.replaceNonstandardResidues()
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    out = tmp_path_factory.mktemp("structure") / "protein.pdb"
    with open(out, "w") as fh:
        PDBFile.writeFile(fixer.topology, fixer.positions, fh)
    return out


@pytest.fixture(scope="session")
def structure(prepared_pdb) -> md.Trajectory:
    """The prepared protein as a one-frame all-atom mdtraj Trajectory."""
    return md.load(str(prepared_pdb))


@pytest.fixture(scope="session")
def md_files(prepared_pdb, tmp_path_factory) -> dict:
    """Two short MD replicas of the real protein, saved as DCD files, plus topology and energies.

    One minimisation, then two runs from the same minimised structure with different
    velocity and thermostat seeds (independent enough for these tests, and half the cost).
    """
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    pdb = app.PDBFile(str(prepared_pdb))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                             constraints=app.HBonds, hydrogenMass=4 * u.amu)

    def simulation(seed):
        # OpenMM reads the integrator's seed when the Context is created: set it before
        integ = mm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, MD_STEP_FS * u.femtosecond)
        integ.setRandomNumberSeed(seed)
        return app.Simulation(pdb.topology, system, integ, mm.Platform.getPlatformByName("CPU"), {"Threads": "1"})

    sim = simulation(1)
    sim.context.setPositions(pdb.positions)
    sim.minimizeEnergy(maxIterations=20)
    start = sim.context.getState(getPositions=True).getPositions()
    folder = tmp_path_factory.mktemp("md")
    paths = {"top": str(prepared_pdb), "dt_ns": MD_DT_NS}
    for name, seed in (("replica1", 11), ("replica2", 12)):
        sim = simulation(seed)
        sim.context.setPositions(start)
        sim.context.setVelocitiesToTemperature(300 * u.kelvin, seed)
        xyz, energies = [], []
        for _ in range(MD_FRAMES):
            sim.step(MD_STEPS_PER_FRAME)
            state = sim.context.getState(getPositions=True, getEnergy=True)
            xyz.append(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
            energies.append(state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))
        path = str(folder / f"{name}.dcd")
        md.Trajectory(np.array(xyz), md.Topology.from_openmm(pdb.topology)).save_dcd(path)
        paths[name] = path
        paths[f"{name}_energies"] = np.array(energies)
    return paths


@pytest.fixture(scope="session")
def md_pair(md_files) -> tuple[md.Trajectory, md.Trajectory]:
    """(reference, replica) loaded from the DCD files."""
    ref = md.load(md_files["replica1"], top=md_files["top"])
    rep = md.load(md_files["replica2"], top=md_files["top"])
    return ref, rep


def _ca_only(traj: md.Trajectory) -> md.Trajectory:
    return traj.atom_slice(traj.topology.select("name CA"))


def _random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


@pytest.fixture(scope="session")
def ca_only():
    """Function: Cα-only copy of a trajectory (as the baselines produce)."""
    return _ca_only


@pytest.fixture(scope="session")
def random_rotations():
    """Function (n, rng) -> uniform random proper rotations, shape (n, 3, 3)."""
    return _random_rotations


@pytest.fixture(scope="session")
def ca_structure(structure) -> md.Trajectory:
    """Cα-only one-frame trajectory of the real protein."""
    return _ca_only(structure)
