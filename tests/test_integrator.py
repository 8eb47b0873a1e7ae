"""StarMDIntegrator under OpenMM's own Simulation, reporters and Context (openmm_starmd/integrator.py).

The protein is the 2K39 ubiquitin fragment (10 residues, prepared with PDBFixer, amber14 + OBC2)
so each run takes seconds. The model is a small, untrained STAR-MD network: its frames are not
protein-like, which is fine for everything the integrator itself promises (step count, time,
reporters, resuming, errors). Whether backmapped generated frames keep their peptide bonds and Cα
positions needs a model whose frames look like a protein: that test runs with the bundled trained
model and is skipped while there is none (tests/test_backmap.py checks the same properties on real
conformations).
"""
from __future__ import annotations

import csv
import json
import struct
import warnings

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_starmd.diffusion.se3_diffuser import SE3Diffuser
from openmm_starmd.integrator import StarMDError, StarMDIntegrator
from openmm_starmd.model import ModelConfig, StarMDNetwork
from openmm_starmd.prepare import prepare_protein

TINY = ModelConfig(width=32, heads=2, blocks=2, joint_layers=1, query_points=2, value_points=2, window=4,
                   x0_anchor="noisy")  # a fresh network returns its noisy input: seeds matter


def tiny_model(seed: int = 0, nan: bool = False):
    """(network, diffuser) of a small randomly initialised STAR-MD network."""
    torch.manual_seed(seed)
    network = StarMDNetwork(TINY)
    if nan:
        with torch.no_grad():
            network.head.bias.fill_(float("nan"))
    return network, SE3Diffuser()


def integrator(**kwargs) -> StarMDIntegrator:
    options = dict(dt=0.5 * unit.nanoseconds, model=tiny_model(), device="cpu", diffusion_steps=2, seed=7)
    options.update(kwargs)
    return StarMDIntegrator(**options)


class Fragment:
    def __init__(self, path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "3 models found; using model 1"
            prepared = prepare_protein(path)
        self.topology = prepared.topology
        self.positions = prepared.positions
        self.system = app.ForceField("amber14-all.xml", "implicit/obc2.xml").createSystem(
            self.topology, constraints=app.HBonds
        )

    def simulation(self, integ) -> app.Simulation:
        sim = app.Simulation(self.topology, self.system, integ, openmm.Platform.getPlatformByName("CPU"))
        sim.context.setPositions(self.positions)
        return sim


@pytest.fixture(scope="module")
def fragment(nmr_models_pdb):
    return Fragment(nmr_models_pdb)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny network's matrices are far too small to gain from threads; on a busy machine the
    thread pool costs ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positions(context) -> np.ndarray:
    return context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def _dcd_time_per_frame_ps(path) -> tuple[int, int, float]:
    """(first step, interval, ps per frame) from a DCD header as OpenMM writes it."""
    with open(path, "rb") as handle:
        head = handle.read(48)
    assert struct.unpack_from("<i4s", head, 0) == (84, b"CORD")
    _, first_step, interval = struct.unpack_from("<3i", head, 8)
    (dt_akma,) = struct.unpack_from("<f", head, 44)
    return first_step, interval, interval * dt_akma * 0.04888821


class PositionLog:
    """Reporter recording step, positions and the integrator's generated frames at every report."""

    def __init__(self, interval):
        self.interval, self.records = interval, []

    def describeNextReport(self, simulation):  # noqa: N802 (OpenMM protocol)
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions"]}

    def report(self, simulation, state):
        frames = simulation.integrator.generated_frames
        self.records.append((simulation.currentStep, state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), frames))


def test_the_user_script_with_dcd_and_state_data_reporters(fragment, tmp_path):
    integ = integrator()
    assert integ.getStepSize() == 500 * unit.picoseconds
    sim = fragment.simulation(integ)
    dcd, log = tmp_path / "traj.dcd", tmp_path / "log.csv"
    sim.reporters += [
        app.DCDReporter(str(dcd), 5),
        app.StateDataReporter(str(log), 5, step=True, time=True, potentialEnergy=True, temperature=True, speed=True),
    ]
    start = _positions(sim.context)
    sim.step(12)

    assert sim.currentStep == 12
    assert sim.context.getState().getTime().value_in_unit(unit.nanosecond) == pytest.approx(6.0)
    # Backmapped only where positions were read: reports at 5 and 10, and the end at 12.
    assert integ.frames_generated == 12 and integ.frames_backmapped == 3
    assert integ.strained_frames == 0  # physical frames: nothing flagged
    assert integ.history_length == 13
    assert not np.allclose(_positions(sim.context), start)

    traj = mdtraj.load_dcd(str(dcd), top=mdtraj.Topology.from_openmm(fragment.topology))
    assert traj.n_frames == 2 and traj.n_atoms == fragment.topology.getNumAtoms()
    assert np.all(np.isfinite(traj.xyz))
    first_step, interval, ps_per_frame = _dcd_time_per_frame_ps(dcd)
    assert (first_step, interval) == (5, 5)
    assert ps_per_frame == pytest.approx(2500.0, rel=1e-5)  # 5 steps x 0.5 ns

    with open(log) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r['#"Step"']) for r in rows] == [5, 10]
    assert [float(r["Time (ps)"]) / 1000.0 for r in rows] == pytest.approx([2.5, 5.0])
    energies = [float(r["Potential Energy (kJ/mole)"]) for r in rows]
    assert np.all(np.isfinite(energies))
    temperatures = [float(r["Temperature (K)"]) for r in rows]
    assert all(100.0 < t < 600.0 for t in temperatures)  # Maxwell-Boltzmann at 300 K, 168 atoms


def test_zero_velocities_without_temperature(fragment):
    sim = fragment.simulation(integrator(temperature=None, backmap="none"))
    sim.step(2)
    v = sim.context.getState(getVelocities=True).getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    assert np.all(v == 0.0)


def test_resume_from_saved_states_equals_the_uninterrupted_run(fragment, tmp_path):
    options = dict(backmap_options={"deterministic": True})
    straight = fragment.simulation(integrator(**options))
    straight.step(3)
    straight.step(3)

    first = fragment.simulation(integrator(**options))
    first.step(3)
    first.saveState(str(tmp_path / "openmm.xml"))
    first.integrator.save_state(tmp_path / "starmd.npz")
    del first

    resumed_integrator = integrator(**options)
    resumed_integrator.load_state(tmp_path / "starmd.npz")  # before the Context exists: applied on first step
    resumed = app.Simulation(fragment.topology, fragment.system, resumed_integrator, openmm.Platform.getPlatformByName("CPU"))
    resumed.loadState(str(tmp_path / "openmm.xml"))
    resumed.step(3)

    assert resumed.currentStep == straight.currentStep == 6
    assert resumed.context.getState().getTime() == straight.context.getState().getTime()
    a, b = straight.integrator.generated_frames, resumed.integrator.generated_frames
    assert torch.equal(a.rots, b.rots) and torch.equal(a.trans, b.trans)
    np.testing.assert_array_equal(_positions(resumed.context), _positions(straight.context))
    assert resumed.integrator.history_length == straight.integrator.history_length == 7


def test_user_moving_atoms_starts_a_new_trajectory(fragment):
    sim = fragment.simulation(integrator(backmap="none"))
    sim.step(3)
    assert sim.integrator.history_length == 4
    sim.step(2)  # positions untouched: the same trajectory goes on
    assert sim.integrator.history_length == 6
    first_frames = sim.integrator.generated_frames

    sim.context.setPositions(fragment.positions)
    sim.step(2)
    assert sim.integrator.history_length == 3
    assert not torch.equal(sim.integrator.generated_frames.trans, first_frames.trans)

    sim.minimizeEnergy(maxIterations=20)
    sim.step(1)
    assert sim.integrator.history_length == 2
    assert sim.currentStep == 8


def test_bare_context_with_bind(fragment):
    integ = integrator(backmap="none")
    context = openmm.Context(fragment.system, integ, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(fragment.positions)
    with pytest.raises(StarMDError, match="bind"):
        integ.step(1)
    integ.bind(context, fragment.topology)
    before = _positions(context)
    integ.step(2)
    assert context.getStepCount() == 2
    assert context.getState().getTime().value_in_unit(unit.nanosecond) == pytest.approx(1.0)
    assert integ.frames_backmapped == 1  # outside Simulation every call ends with a backmap
    moved = _positions(context)
    assert not np.allclose(moved, before)
    # Rigid transport puts every Cα exactly on its generated frame origin.
    ca = [a.index for a in fragment.topology.atoms() if a.name == "CA"]
    np.testing.assert_allclose(moved[ca], integ.generated_frames.trans.numpy(), atol=1e-6)


def test_nan_from_the_model_leaves_the_context_untouched(fragment):
    # One reverse step: the network's NaN output is the returned frame itself.
    sim = fragment.simulation(integrator(model=tiny_model(nan=True), diffusion_steps=1))
    before = _positions(sim.context)
    with pytest.raises(StarMDError, match="non-finite frames between steps 0 and 3; the Context was left unchanged"):
        sim.step(3)
    assert sim.currentStep == 0
    assert sim.context.getState().getTime().value_in_unit(unit.picosecond) == 0.0
    np.testing.assert_array_equal(_positions(sim.context), before)


def test_invalid_setups_are_named(fragment, ubiquitin_pdb):
    with pytest.raises(ValueError, match="dt=0.001 ns is outside the 0.01-10 ns range"):
        integrator(dt=1 * unit.picoseconds)
    with pytest.raises(ValueError, match="dt=20 ns is outside"):
        integrator(dt=20 * unit.nanoseconds)
    with pytest.raises(TypeError, match="has no unit"):
        integrator(dt=1.0)
    with pytest.raises(ValueError, match="backmap='fast' is not known"):
        integrator(backmap="fast")
    with pytest.raises(ValueError, match="steps=0 must be an integer"):
        integrator(diffusion_steps=0)
    with pytest.raises(ValueError, match="step size is the model's frame time"):
        integrator().setStepSize(0.002)

    integ = integrator()
    context = openmm.Context(fragment.system, integ, openmm.Platform.getPlatformByName("CPU"))
    wrong = app.PDBFile(str(ubiquitin_pdb)).topology
    with pytest.raises(ValueError, match=r"System has 168 particles but the Topology has \d+ atoms"):
        integ.bind(context, wrong)

    # Explicit water is refused: the integrator only moves the protein.
    pdb = app.PDBFile(str(ubiquitin_pdb))
    system = openmm.System()
    for atom in pdb.topology.atoms():
        system.addParticle(atom.element.mass)
    watery = integrator()
    context = openmm.Context(system, watery, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(pdb.positions)
    watery.bind(context, pdb.topology)
    with pytest.raises(StarMDError, match="81 water molecules"):
        watery.step(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback when CUDA is missing")
def test_cuda_request_without_cuda_falls_back_to_cpu():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        integ = integrator(device="cuda")
    assert integ.device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bundled_model_on_cuda_steps_and_backmaps(crambin_pdb, tmp_path):
    """On a GPU the integrator runs the bundled model on CUDA: frames move, backmapped atoms are
    finite with intact peptide bonds, and the DCD holds every reported frame."""
    crambin = Fragment(crambin_pdb)
    integ = StarMDIntegrator(dt=1 * unit.nanoseconds, device="cuda", seed=0)
    assert integ.device.startswith("cuda")
    sim = crambin.simulation(integ)
    log = PositionLog(2)
    sim.reporters += [log, app.DCDReporter(str(tmp_path / "t.dcd"), 2)]
    sim.step(6)
    assert len(log.records) == 3
    idx = _backbone_indices(crambin.topology)
    for step, x, frames in log.records:
        assert np.isfinite(x).all(), f"step {step}"
        bonds = 10 * np.linalg.norm(x[idx["N"][1:]] - x[idx["C"][:-1]], axis=-1)
        assert 1.25 < bonds.min() and bonds.max() < 1.45, f"step {step}"
    first, last = log.records[0][2].trans.numpy(), log.records[-1][2].trans.numpy()
    assert np.abs(first - last).max() > 0.01  # nm: the frames moved between steps 2 and 6
    assert mdtraj.load(str(tmp_path / "t.dcd"), top=mdtraj.Topology.from_openmm(crambin.topology)).n_frames == 3


def test_found_through_openmms_own_simulation_call_stack(fragment):
    """The Context is found from Simulation.step -> _simulate -> integrator.step, and chunking
    (Simulation steps the integrator at most 10 at a time) does not add backmaps."""
    sim = fragment.simulation(integrator(backmap="none"))
    sim.step(25)  # chunks of 10, 10, 5; no reporters
    assert sim.currentStep == 25
    assert sim.integrator.frames_backmapped == 1
    assert sim.integrator.frames_generated == 25


def test_model_from_a_checkpoint_brings_its_sampling_config(fragment, tmp_path):
    from openmm_starmd.checkpoints import save_model
    from openmm_starmd.diffusion import DiffusionConfig
    from openmm_starmd.sampling import SamplingConfig

    network, _ = tiny_model()
    path = save_model(tmp_path / "tiny.pt", network, DiffusionConfig(), SamplingConfig(steps=3, window=2))
    integ = StarMDIntegrator(dt=0.5 * unit.nanoseconds, model=str(path), device="cpu", seed=1, backmap="none")
    assert (integ.sampling_config.steps, integ.sampling_config.window) == (3, 2)
    overridden = StarMDIntegrator(dt=0.5 * unit.nanoseconds, model=path, device="cpu", diffusion_steps=1)
    assert (overridden.sampling_config.steps, overridden.sampling_config.window) == (1, 2)
    sim = fragment.simulation(integ)
    sim.step(2)
    assert sim.currentStep == 2 and integ.history_length == 3
    with pytest.raises(TypeError, match="is not a loaded STAR-MD model"):
        StarMDIntegrator(model=object())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StarMDIntegrator(model=tmp_path / "missing.pt")


def test_dt_outside_the_models_trained_range_warns(tmp_path):
    from openmm_starmd.checkpoints import save_model
    from openmm_starmd.diffusion import DiffusionConfig

    network, _ = tiny_model()
    path = save_model(tmp_path / "tiny.pt", network, DiffusionConfig(), metadata={"trained_dt_ns": [0.01, 0.14]})
    with pytest.warns(UserWarning, match=r"outside the Δt range this model's training data covered \(0.01-0.14 ns"):
        StarMDIntegrator(dt=1 * unit.nanoseconds, model=path, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StarMDIntegrator(dt=0.1 * unit.nanoseconds, model=path, device="cpu")


def test_run_for_clock_time_leaves_current_positions(fragment):
    """runForClockTime may stop after any chunk, so every chunk ends with a backmap."""
    sim = fragment.simulation(integrator(backmap="none"))
    sim.runForClockTime(0.3 * unit.seconds)
    integ = sim.integrator
    assert sim.currentStep == integ.frames_generated > 0
    assert integ.frames_backmapped == -(-integ.frames_generated // 10)  # one per chunk of <= 10
    ca = [a.index for a in fragment.topology.atoms() if a.name == "CA"]
    np.testing.assert_allclose(_positions(sim.context)[ca], integ.generated_frames.trans.numpy(), atol=1e-6)


def _trained_model():
    try:
        from openmm_starmd.checkpoints import load_model

        return load_model()
    except (ImportError, FileNotFoundError, OSError) as exc:
        pytest.skip(f"needs the bundled trained STAR-MD model ({exc})")


@pytest.fixture(scope="module")
def crambin_rollout(crambin_pdb):
    """The bundled model on unseen crambin at Δt = 1 ns, seed 0, all atoms reported at steps 2, 4, 6:
    (topology, [(step, positions nm, generated frames)])."""
    model = _trained_model()
    crambin = Fragment(crambin_pdb)
    integ = StarMDIntegrator(dt=1 * unit.nanoseconds, model=model, device="cpu", seed=0)
    sim = crambin.simulation(integ)
    log = PositionLog(2)
    sim.reporters.append(log)
    sim.step(6)
    assert len(log.records) == 3
    return crambin.topology, log.records


def _backbone_indices(topology):
    residues = list(topology.residues())
    return {name: [next(a.index for a in r.atoms() if a.name == name) for r in residues] for name in ("N", "CA", "C")}


def test_backmapped_generated_frames_keep_peptide_bonds(crambin_rollout):
    """After backmapping the bundled model's frames every peptide bond is 1.25-1.45 Å (the release
    model of 2026-11-27 measured 1.30-1.38 Å over seeds 0-2, interim v5 1.31-1.37 Å)."""
    topology, records = crambin_rollout
    idx = _backbone_indices(topology)
    for step, x, _frames in records:
        bonds = 10 * np.linalg.norm(x[idx["N"][1:]] - x[idx["C"][:-1]], axis=-1)
        assert 1.25 < bonds.min() and bonds.max() < 1.45, f"step {step}"


@pytest.mark.xfail(strict=True, reason=(
    "the release model of 2026-11-27 (variant b, Δt-dependent anchor prior) needs 0.096-0.120 Å RMSD "
    "of Cα give in the backmap (seeds 0-2; seed 0: 0.097-0.110); interim v5 needed 0.072-0.087 Å. "
    "See the model card."))
def test_backmapped_ca_stay_within_0p1_A_of_generated_frames_peptide(crambin_rollout):
    """The backmap's restrained minimisation moves the Cα less than 0.1 Å RMSD from the generated
    frames: a measure of how much local geometry the model leaves for the backmap to repair (v4
    failed it at 0.13 Å, v5 passed at 0.079-0.089 Å with seed 0)."""
    topology, records = crambin_rollout
    ca = _backbone_indices(topology)["CA"]
    for step, x, frames in records:
        rmsd = 10 * np.sqrt(np.mean(np.sum((x[ca] - frames.trans.numpy()) ** 2, -1)))
        assert rmsd < 0.1, f"step {step}: Cα RMSD {rmsd:.3f} Å"


def test_disulfides_of_the_topology_keep_their_ca_distance(crambin_pdb):
    """Crambin's three disulfides are found in the Topology and every generated frame keeps their
    Cα–Cα distance within DISULFIDE_CA_RANGE_NM (a random tiny model would pull them anywhere)."""
    from openmm_starmd.protein import DISULFIDE_CA_RANGE_NM

    crambin = Fragment(crambin_pdb)
    integ = integrator(backmap="none", seed=1)
    sim = crambin.simulation(integ)
    pairs = None
    lo, hi = DISULFIDE_CA_RANGE_NM
    for _ in range(6):
        sim.step(1)
        if pairs is None:
            pairs = integ._pair_bounds[0]
            assert sorted(map(tuple, pairs.tolist())) == [(2, 39), (3, 31), (15, 25)]  # C3-C40, C4-C32, C16-C26
        x = integ.generated_frames.trans
        d = torch.linalg.vector_norm(x[pairs[:, 1]] - x[pairs[:, 0]], dim=-1)
        assert bool(((d >= lo - 1e-5) & (d <= hi + 1e-5)).all()), d.tolist()
    # and the switch turns it off
    off = integrator(backmap="none", seed=1, keep_disulfides=False)
    crambin.simulation(off).step(1)
    assert off._pair_bounds is None
    # the Cα projection (on by default) acted on each of the 6 frames of the tiny random model; off, never
    assert integ.ca_projection["frames"] == 6 and integ.ca_projection["moved"] == 6
    raw = integrator(backmap="none", seed=1, keep_ca_geometry=False)
    assert raw.ca_projection["frames"] == 0
    crambin.simulation(raw).step(2)
    assert raw.ca_projection == {"frames": 0, "moved": 0, "unconverged": 0, "max_violation_nm": 0.0, "max_move_nm": 0.0}
    link = torch.linalg.vector_norm(raw.generated_frames.trans[1:] - raw.generated_frames.trans[:-1], dim=-1)
    assert float(link.max()) > 0.42  # without it the random network's chain is broken


def test_state_file_tree_round_trip():
    """save_state's pickle-free encoding of nested plain data restores every leaf exactly."""
    from openmm_starmd.integrator import _flatten, _unflatten

    rng = np.random.default_rng(0)
    tree = {
        "a": torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7,
        "b": {"c": rng.normal(size=(2, 0, 3)), "d": None, "e": 3, "f": "window", "g": {}},
        "h": [np.ones(2, dtype=np.uint8), {"i": torch.tensor([True, False])}],
        "j": np.float32(0.5),
        "k": rng.bit_generator.state,
    }
    arrays, meta = {}, {}
    _flatten(tree, "", arrays, meta)
    back = _unflatten(arrays, json.loads(json.dumps(meta)))
    assert torch.equal(back["a"], tree["a"]) and back["a"].dtype == torch.float64
    assert back["b"]["c"].shape == (2, 0, 3)
    assert back["b"]["d"] is None and back["b"]["e"] == 3 and back["b"]["f"] == "window" and back["b"]["g"] == {}
    assert back["h"][0].dtype == np.uint8 and torch.equal(back["h"][1]["i"], tree["h"][1]["i"])
    assert back["j"] == 0.5
    assert back["k"] == tree["k"]
