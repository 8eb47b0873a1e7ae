"""Backmapping generated frames to all-atom positions (openmm_starmd/backmap.py).

Targets are real: the frames of other NMR models of the same ubiquitin fragment (2K39), and, for
a whole protein, crambin frames moved by a small random rigid motion per residue.

Peptide-bond check: amber's C-N bond (r0 1.335 Å, 2K = 4100 kJ/mol/Å²) fluctuates by
sqrt(kT/2K) ≈ 0.025 Å at 300 K, so after minimisation every C(i)-N(i+1) must lie within
[1.25, 1.45] Å (about 4.5 thermal standard deviations either side), and closer to 1.335 Å than
after rigid transport alone.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_starmd.backmap import (
    Backmapper,
    BackmapError,
    VACUUM_DIELECTRIC,
    BackmapWarning,
    atom_layout,
    backbone_particles,
    disulfide_bonds,
    rigid_transport,
    screen_coulomb,
    separate_overlaps,
    shield_bare_hydrogens,
    without_implicit_solvent,
)
from openmm_starmd.geometry import so3
from openmm_starmd.geometry.frames import frames_from_backbone
from openmm_starmd.geometry.rigid import Rigid, apply, compose
from openmm_starmd.prepare import prepare_protein
from openmm_starmd.protein import extract_protein, read_structure

STRUCTURES = Path(__file__).resolve().parents[1] / "training" / "structures"

PEPTIDE_MIN_A, PEPTIDE_MAX_A = 1.25, 1.45
CA_RMSD_MAX_A = 0.1


def _frames(x_nm: np.ndarray, backbone_atoms: np.ndarray) -> Rigid:
    x = torch.as_tensor(np.asarray(x_nm), dtype=torch.float64)
    return frames_from_backbone(x[backbone_atoms[:, 0]], x[backbone_atoms[:, 1]], x[backbone_atoms[:, 2]])


def _peptide_bonds_a(x_nm: np.ndarray, backbone_atoms: np.ndarray) -> np.ndarray:
    return 10 * np.linalg.norm(x_nm[backbone_atoms[1:, 0]] - x_nm[backbone_atoms[:-1, 2]], axis=-1)


def _ca_rmsd_a(x_nm: np.ndarray, backbone_atoms: np.ndarray, frames: Rigid) -> float:
    d = x_nm[backbone_atoms[:, 1]] - frames.trans.numpy()
    return 10 * float(np.sqrt(np.mean(np.sum(d * d, -1))))


class Prepared:
    """A prepared structure with its System, layout and starting frames."""

    def __init__(self, path, forcefield):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "N models found; using model 1"
            prepared = prepare_protein(path)
        self.topology = prepared.topology
        self.positions_nm = np.asarray(prepared.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        self.protein = extract_protein(prepared.topology, prepared.positions)
        self.system = app.ForceField(*forcefield).createSystem(self.topology, constraints=app.HBonds)
        self.atom_residue, self.backbone_atoms = atom_layout(self.topology, self.protein.topology_residue_index)
        self.frames = _frames(self.positions_nm, self.backbone_atoms)


@pytest.fixture(scope="module")
def fragment(nmr_models_pdb):
    """2K39 model 0 (ubiquitin 1-10) prepared, amber14 + OBC2 (a CustomGBForce)."""
    return Prepared(nmr_models_pdb, ("amber14-all.xml", "implicit/obc2.xml"))


@pytest.fixture(scope="module")
def nmr_targets(nmr_models_pdb):
    """Frames of 2K39 models 1 and 2: real other conformations of the same fragment."""
    out = []
    for model in (1, 2):
        topology, positions = read_structure(nmr_models_pdb, model=model)
        bb = torch.as_tensor(extract_protein(topology, positions).backbone_nm, dtype=torch.float64)
        out.append(frames_from_backbone(bb[:, 0], bb[:, 1], bb[:, 2]))
    return out


def _random_motion(frames: Rigid, degrees: float, nm: float, seed: int) -> Rigid:
    g = torch.Generator().manual_seed(seed)
    n = frames.trans.shape[0]
    rot = so3.exp_map(torch.randn(n, 3, generator=g, dtype=torch.float64) * np.deg2rad(degrees))
    shift = torch.randn(n, 3, generator=g, dtype=torch.float64) * nm
    return Rigid(rot @ frames.rots, frames.trans + shift)


def test_nmr_conformations_backmap_cleanly_and_leave_user_objects_alone(fragment, nmr_targets):
    system_xml = openmm.XmlSerializer.serialize(fragment.system)
    user_context = openmm.Context(
        fragment.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    user_context.setPositions(fragment.positions_nm)
    before = user_context.getState(getPositions=True).getPositions(asNumpy=True)

    backmapper = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU")
    rigid_only = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="none")
    for i, target in enumerate(nmr_targets):  # one Backmapper, its Context reused with new targets
        result = backmapper.backmap(fragment.positions_nm, fragment.frames, target, frame_index=i)
        x = result.positions_nm
        assert np.all(np.isfinite(x))
        bonds = _peptide_bonds_a(x, fragment.backbone_atoms)
        assert bonds.min() > PEPTIDE_MIN_A and bonds.max() < PEPTIDE_MAX_A
        assert _ca_rmsd_a(x, fragment.backbone_atoms, target) < CA_RMSD_MAX_A
        assert result.restraint_rmsd_nm == pytest.approx(_ca_rmsd_a(x, fragment.backbone_atoms, target) / 10)
        transported = rigid_only.backmap(fragment.positions_nm, fragment.frames, target)
        strain = np.abs(_peptide_bonds_a(transported.positions_nm, fragment.backbone_atoms) - 1.335).max()
        assert np.abs(bonds - 1.335).max() < strain
        assert np.isfinite(result.potential_energy_kj)
        assert result.potential_energy_kj < transported.potential_energy_kj
        # The HBonds constraints hold exactly (they are stiff bonds only inside the minimiser).
        for k in range(fragment.system.getNumConstraints()):
            a, b, length = fragment.system.getConstraintParameters(k)
            d = np.linalg.norm(x[a] - x[b])
            assert d == pytest.approx(length.value_in_unit(unit.nanometer), rel=1e-5)

    assert openmm.XmlSerializer.serialize(fragment.system) == system_xml
    after = user_context.getState(getPositions=True).getPositions(asNumpy=True)
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_fixed_hold_keeps_the_generated_ca_exactly(fragment, nmr_targets):
    """hold="fix": Cα end on the generated frame origins (to the ~1e-5 nm the X-H constraints
    move them), where harmonic restraints let them give way; bonds still repaired."""
    fixed = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, hold="fix", platform="CPU")
    soft = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU",
                      restraint_k=1e3)
    for target in nmr_targets:
        x = fixed.backmap(fragment.positions_nm, fragment.frames, target).positions_nm
        dev = np.linalg.norm(x[fragment.backbone_atoms[:, 1]] - target.trans.numpy(), axis=-1)
        assert dev.max() < 1e-4
        bonds = _peptide_bonds_a(x, fragment.backbone_atoms)
        assert bonds.min() > PEPTIDE_MIN_A and bonds.max() < PEPTIDE_MAX_A
        y = soft.backmap(fragment.positions_nm, fragment.frames, target).positions_nm
        assert np.linalg.norm(y[fragment.backbone_atoms[:, 1]] - target.trans.numpy(), axis=-1).max() > 1e-3
        for k in range(fragment.system.getNumConstraints()):
            a, b, length = fragment.system.getConstraintParameters(k)
            assert np.linalg.norm(x[a] - x[b]) == pytest.approx(length.value_in_unit(unit.nanometer), rel=1e-5)


def test_ca_damage_is_judged_against_the_generated_trace(fragment, nmr_targets):
    bm = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU")
    out = bm.backmap(fragment.positions_nm, fragment.frames, nmr_targets[0], compute_energy=False).positions_nm
    assert not bm.ca_damaged(out)
    ca = fragment.backbone_atoms[:, 1]
    broken = out.copy()
    broken[ca[5]] += np.array([0.0, 0.0, 0.6])  # residue 5 leaves its neighbours: a break
    assert bm.ca_damaged(broken)
    clash = out.copy()
    clash[ca[7]] = clash[ca[4]] + np.array([0.02, 0.0, 0.0])  # residues 4 and 7 on top of each other
    assert bm.ca_damaged(clash)
    # a break the generated frames already have is not the backmap's doing
    bm._targets = bm._targets.copy()
    bm._targets[5] += np.array([0.0, 0.0, 0.6])
    assert not bm.ca_damaged(broken)


def test_frames_whose_ca_trace_the_restraints_break_are_minimised_again_with_ca_fixed(tmp_path):
    """2M9I under large random residue motions (120°, 0.5 Å): the restrained minimisation breaks
    the Cα trace of some frames; repair_ca (the default) redoes exactly those with Cα fixed."""
    wm = Prepared(str(STRUCTURES / "2M9I.pdb"), ("amber14-all.xml", "implicit/obc2.xml"))
    plain = Backmapper(wm.system, wm.atom_residue, wm.backbone_atoms, platform="CPU", repair_ca=False,
                       deterministic=True)
    repairing = Backmapper(wm.system, wm.atom_residue, wm.backbone_atoms, platform="CPU", deterministic=True)
    damaged = 0
    for seed in range(10):
        target = _random_motion(wm.frames, degrees=120.0, nm=0.05, seed=seed)
        a = plain.backmap(wm.positions_nm, wm.frames, target, compute_energy=False).positions_nm
        damaged += plain.ca_damaged(a)
        b = repairing.backmap(wm.positions_nm, wm.frames, target, compute_energy=False).positions_nm
        assert not repairing.ca_damaged(b)
        assert np.all(np.isfinite(b))
    assert damaged >= 1  # otherwise this test would show nothing
    assert repairing.ca_repaired_frames == damaged and plain.ca_repaired_frames == 0


def test_system_mode_energy_is_the_full_system_energy(fragment, nmr_targets):
    backmapper = Backmapper(
        fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="system", restrain="backbone",
        platform="CPU",
    )
    result = backmapper.backmap(fragment.positions_nm, fragment.frames, nmr_targets[0])
    x = result.positions_nm
    assert _ca_rmsd_a(x, fragment.backbone_atoms, nmr_targets[0]) < CA_RMSD_MAX_A
    assert 10 * result.restraint_rmsd_nm < CA_RMSD_MAX_A  # N, CA and C all held
    bonds = _peptide_bonds_a(x, fragment.backbone_atoms)
    assert bonds.min() > PEPTIDE_MIN_A and bonds.max() < PEPTIDE_MAX_A
    reference = openmm.Context(fragment.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    reference.setPositions(x)
    expected = reference.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert result.potential_energy_kj == pytest.approx(expected, abs=1e-2 * max(1.0, abs(expected)))


def test_crambin_random_residue_motion(crambin_pdb):
    crambin = Prepared(crambin_pdb, ("amber14-all.xml", "implicit/obc2.xml"))
    target = _random_motion(crambin.frames, degrees=3.0, nm=0.01, seed=0)
    result = Backmapper(crambin.system, crambin.atom_residue, crambin.backbone_atoms, platform="CPU").backmap(
        crambin.positions_nm, crambin.frames, target, compute_energy=False
    )
    bonds = _peptide_bonds_a(result.positions_nm, crambin.backbone_atoms)
    assert bonds.min() > PEPTIDE_MIN_A and bonds.max() < PEPTIDE_MAX_A
    assert _ca_rmsd_a(result.positions_nm, crambin.backbone_atoms, target) < CA_RMSD_MAX_A
    assert result.potential_energy_kj is None
    # The three disulfides survive (S-S bond 2.04 Å).
    ss = [(a.index, b.index) for a, b in crambin.topology.bonds() if a.name == "SG" and b.name == "SG"]
    assert len(ss) == 3
    for i, j in ss:
        assert 1.9 < 10 * np.linalg.norm(result.positions_nm[i] - result.positions_nm[j]) < 2.2


def test_a_disulfide_pulled_apart_is_flagged_not_hidden(crambin_pdb):
    """Crambin's three disulfides are found in the System alone; a frame that moves one cysteine
    (with its neighbours) 1.5 nm away breaks a disulfide (3.3 Å): kept, counted, warned about once."""
    crambin = Prepared(crambin_pdb, ("amber14-all.xml", "implicit/obc2.xml"))
    ss = {tuple(sorted((a.index, b.index))) for a, b in crambin.topology.bonds() if a.name == "SG" and b.name == "SG"}
    assert {tuple(p) for p in disulfide_bonds(crambin.system).tolist()} == ss and len(ss) == 3
    bm = Backmapper(crambin.system, crambin.atom_residue, crambin.backbone_atoms, platform="CPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackmapWarning)  # the real structure is not flagged
        bm.backmap(crambin.positions_nm, crambin.frames, crambin.frames, compute_energy=False)
    assert bm.strained_frames == 0
    cys = sorted({crambin.atom_residue[i] for i in next(iter(ss))})[0]  # residue index of one cysteine
    trans = crambin.frames.trans.clone()
    moved = slice(max(0, cys - 1), cys + 2)
    trans[moved] = trans[moved] + torch.tensor([1.5, 0.0, 0.0], dtype=trans.dtype)
    pulled = Rigid(crambin.frames.rots, trans)
    with pytest.warns(BackmapWarning, match=r"disulfide .* stretched to"):
        out = bm.backmap(crambin.positions_nm, crambin.frames, pulled, compute_energy=False)
    assert np.isfinite(out.positions_nm).all() and bm.strained_frames == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackmapWarning)  # counted again, not warned again
        bm.backmap(crambin.positions_nm, crambin.frames, pulled, compute_energy=False)
    assert bm.strained_frames == 2


def test_rigid_transport_lands_frames_exactly_and_keeps_residue_geometry(fragment, nmr_targets):
    target = nmr_targets[0]
    moved = rigid_transport(fragment.positions_nm, fragment.atom_residue, fragment.frames, target)
    recomputed = _frames(moved, fragment.backbone_atoms)
    assert torch.allclose(recomputed.rots, target.rots, atol=1e-9)
    assert torch.allclose(recomputed.trans, target.trans, atol=1e-12)
    for i in range(len(fragment.protein)):
        atoms = np.flatnonzero(fragment.atom_residue == i)
        before = np.linalg.norm(fragment.positions_nm[atoms, None] - fragment.positions_nm[None, atoms], axis=-1)
        after = np.linalg.norm(moved[atoms, None] - moved[None, atoms], axis=-1)
        np.testing.assert_allclose(after, before, atol=1e-12)
    # Same frames: nothing moves.
    same = rigid_transport(fragment.positions_nm, fragment.atom_residue, fragment.frames, fragment.frames)
    np.testing.assert_allclose(same, fragment.positions_nm, atol=1e-12)


def test_rigid_only_mode_is_se3_equivariant(fragment, nmr_targets):
    """Moving every generated frame by g moves the backmapped structure by g."""
    g = Rigid(so3.exp_map(torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64)), torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64))
    g_n = Rigid(g.rots.expand(len(fragment.protein), 3, 3), g.trans.expand(len(fragment.protein), 3))
    backmapper = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="none")
    plain = backmapper.backmap(fragment.positions_nm, fragment.frames, nmr_targets[0], compute_energy=False)
    moved = backmapper.backmap(fragment.positions_nm, fragment.frames, compose(g_n, nmr_targets[0]), compute_energy=False)
    expected = apply(g, torch.as_tensor(plain.positions_nm)).numpy()
    np.testing.assert_allclose(moved.positions_nm, expected, atol=1e-9)
    assert plain.restraint_rmsd_nm == pytest.approx(0.0, abs=1e-12)


def test_deterministic_backmap_repeats_bitwise(fragment, nmr_targets):
    def make():
        return Backmapper(
            fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU", deterministic=True
        )

    backmapper = make()
    a = backmapper.backmap(fragment.positions_nm, fragment.frames, nmr_targets[1], compute_energy=False)
    b = backmapper.backmap(fragment.positions_nm, fragment.frames, nmr_targets[1], compute_energy=False)
    c = make().backmap(fragment.positions_nm, fragment.frames, nmr_targets[1], compute_energy=False)
    np.testing.assert_array_equal(a.positions_nm, b.positions_nm)
    np.testing.assert_array_equal(a.positions_nm, c.positions_nm)


def test_nan_frames_raise_backmap_error_naming_the_frame(fragment, nmr_targets):
    bad = Rigid(nmr_targets[0].rots.clone(), nmr_targets[0].trans.clone())
    bad.trans[3, 1] = float("nan")
    backmapper = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU")
    with pytest.raises(BackmapError, match="frame 17"):
        backmapper.backmap(fragment.positions_nm, fragment.frames, bad, frame_index=17)


def test_residues_sent_onto_each_other_are_separated_or_flagged(fragment, nmr_targets):
    """Two residues sent to the same frame put their atoms on the same points. Rigid transport alone
    keeps that: the result is flagged once with a BackmapWarning naming the frame and particles and
    counted after. The minimising backmap separates the atoms first and ends with none closer than
    0.3 Å, so nothing is flagged."""
    atoms = list(fragment.topology.atoms())
    target = nmr_targets[0]
    clash = Rigid(target.rots.clone(), target.trans.clone())
    clash.rots[5], clash.trans[5] = target.rots[4], target.trans[4]
    rigid = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="none", platform="CPU")
    with pytest.warns(BackmapWarning, match=r"frame 9 has particles (\d+) and (\d+) only 0 Å apart") as caught:
        # (its energy is infinite: two charged atoms at one point; compute_energy would raise)
        out = rigid.backmap(fragment.positions_nm, fragment.frames, clash, frame_index=9, compute_energy=False)
    assert np.isfinite(out.positions_nm).all() and rigid.strained_frames == 1
    text = str(caught[0].message)
    i, j = (int(v) for v in text.split("particles ")[1].split(" only")[0].split(" and "))
    assert {atoms[i].residue.index, atoms[j].residue.index} == {fragment.protein.topology_residue_index[4],
                                                                 fragment.protein.topology_residue_index[5]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted, not warned again
        rigid.backmap(fragment.positions_nm, fragment.frames, clash, frame_index=10, compute_energy=False)
        assert rigid.strained_frames == 2
        rigid.backmap(fragment.positions_nm, fragment.frames, target, frame_index=11)  # a physical frame
        assert rigid.strained_frames == 2
        minimised = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU")
        res = minimised.backmap(fragment.positions_nm, fragment.frames, clash, frame_index=12)
    assert np.isfinite(res.potential_energy_kj)
    x = res.positions_nm
    assert minimised.strained_frames == 0 and np.isfinite(x).all()
    assert np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(len(x), 1)].min() > 0.03


def test_separate_overlaps_moves_only_close_pairs_apart_to_the_target_distance():
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.02, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    massive = np.array([True, True, True, True, False])  # the last one is a virtual site on particle 3
    y = separate_overlaps(x, massive)
    d = np.linalg.norm(y[:, None] - y[None], axis=-1)
    assert d[0, 1] >= 0.05 - 1e-12 and d[0, 2] >= 0.05 - 1e-12 and d[1, 2] >= 0.05 - 1e-12
    np.testing.assert_array_equal(y[3:], x[3:])  # far away, and a virtual site: untouched
    assert np.abs(y[:3] - x[:3]).max() < 0.1  # moves of a fraction of an Ångström, not more
    np.testing.assert_array_equal(x[0], [0.0, 0.0, 0.0])  # the input is not modified


def test_shielded_hydroxyl_hydrogens_cannot_collapse_onto_a_neighbour(fragment):
    """Amber's hydroxyl H has no Lennard-Jones core: started 0.05 Å from its Thr's CG2 (a 1-4 pair) the
    minimiser pulls it in to the Coulomb singularity; with the shield it escapes to a normal rotamer.
    The shield changes the energy of the real structure by well under 1 kJ/mol."""
    thr = next(r for r in fragment.topology.residues() if r.name == "THR")
    hg1, cg2 = (next(a.index for a in thr.atoms() if a.name == n) for n in ("HG1", "CG2"))
    hydroxyl = [a for a in fragment.topology.atoms()
                if (a.residue.name, a.name) in {("SER", "HG"), ("THR", "HG1"), ("TYR", "HH")}]
    reference = openmm.Platform.getPlatformByName("Reference")

    def minimised(shield: bool):
        system = without_implicit_solvent(fragment.system)
        n = shield_bare_hydrogens(system) if shield else 0
        for i in reversed(range(system.getNumConstraints())):
            system.removeConstraint(i)
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), reference)
        ctx.setPositions(fragment.positions_nm)
        before = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        x = fragment.positions_nm.copy()
        d = x[hg1] - x[cg2]
        x[hg1] = x[cg2] + 0.005 * d / np.linalg.norm(d)
        ctx.setPositions(x)
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
        y = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return n, before, float(np.linalg.norm(y[hg1] - y[cg2]))

    n0, e_plain, collapsed = minimised(False)
    n1, e_shielded, escaped = minimised(True)
    assert n0 == 0 and n1 == len(hydroxyl) == 2  # Thr 7 HG1 and Thr 9 HG1
    assert collapsed < 0.005 and escaped > 0.2  # nm
    assert abs(e_shielded - e_plain) < 1.0  # kJ/mol
    # the user's System is not touched by backmapping, shielded copy or not
    nb = next(f for f in fragment.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getParticleParameters(hg1)[2].value_in_unit(unit.kilojoule_per_mole) == 0


def test_without_implicit_solvent_removes_gb_forces_only(fragment):
    obc = app.ForceField("amber99sbildn.xml", "amber99_obc.xml").createSystem(fragment.topology)
    for system, gb in ((fragment.system, openmm.CustomGBForce), (obc, openmm.GBSAOBCForce)):
        names = sorted(type(f).__name__ for f in system.getForces())
        stripped = without_implicit_solvent(system)
        assert sorted(type(f).__name__ for f in system.getForces()) == names  # original untouched
        left = sorted(type(f).__name__ for f in stripped.getForces())
        assert left == sorted(n for n in names if n != gb.__name__)
        assert stripped.getNumParticles() == system.getNumParticles()


def _nonbonded_energy_kj(system: openmm.System, positions_nm: np.ndarray, coulomb: bool = True) -> float:
    """Energy of ``system``'s NonbondedForce alone (LJ + Coulomb, or LJ only)."""
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for i in reversed(range(copy.getNumForces())):
        if not isinstance(copy.getForce(i), openmm.NonbondedForce):
            copy.removeForce(i)
    if not coulomb:
        screen_coulomb(copy, 1e12)
    context = openmm.Context(copy, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_nm)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_screen_coulomb_divides_the_coulomb_energy_and_keeps_lennard_jones(fragment):
    system = without_implicit_solvent(fragment.system)
    x = fragment.positions_nm
    lj = _nonbonded_energy_kj(system, x, coulomb=False)
    coulomb = _nonbonded_energy_kj(system, x) - lj
    assert abs(coulomb) > 100  # a real protein fragment: the check below is not 0 == 0
    screened = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    screen_coulomb(screened, 4.0)
    assert _nonbonded_energy_kj(screened, x, coulomb=False) == pytest.approx(lj, rel=1e-9)
    assert _nonbonded_energy_kj(screened, x) - lj == pytest.approx(coulomb / 4.0, rel=1e-6)


def test_backbone_particles_are_the_peptide_backbone_atoms(fragment):
    names = [a.name for a in fragment.topology.atoms()]
    picked = backbone_particles(fragment.system, fragment.backbone_atoms)  # HBonds: H bonds are constraints
    want = {"N", "CA", "C", "O", "OXT", "H", "H1", "H2", "H3", "HA", "HA2", "HA3"}
    assert sorted(picked) == sorted(i for i, n in enumerate(names) if n in want)


def test_side_chain_screening_leaves_backbone_pairs_bare(fragment):
    system = without_implicit_solvent(fragment.system)
    bb = backbone_particles(system, fragment.backbone_atoms)
    side = np.setdiff1d(np.arange(system.getNumParticles()), bb)
    screened = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    screen_coulomb(screened, 16.0, side)
    nb = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)][0]
    snb = [f for f in screened.getForces() if isinstance(f, openmm.NonbondedForce)][0]
    for i in (int(bb[0]), int(side[0])):
        q0 = nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
        q1 = snb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
        assert q1 == pytest.approx(q0 if i in bb else q0 / 4.0)
    for k in range(nb.getNumExceptions()):
        a, b, qq0, *_ = nb.getExceptionParameters(k)
        qq1 = snb.getExceptionParameters(k)[2]
        factor = (1.0 if a in bb else 0.25) * (1.0 if b in bb else 0.25)
        assert qq1.value_in_unit(qq0.unit) == pytest.approx(qq0.value_in_unit(qq0.unit) * factor)


def test_bare_vacuum_backmap_repairs_like_the_screened_default(fragment, nmr_targets):
    """dielectric=1 (bare vacuum, the default before 2026-11-27) keeps the guarantees (peptide
    bonds, Cα on target, lower energy than the rigid move) and reaches a different minimum than
    the screened default; the user's System is untouched."""
    system_xml = openmm.XmlSerializer.serialize(fragment.system)
    bare = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU",
                      dielectric=1.0, deterministic=True)
    screened = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, platform="CPU",
                          deterministic=True)
    rigid_only = Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="none")
    for target in nmr_targets:
        result = bare.backmap(fragment.positions_nm, fragment.frames, target)
        x = result.positions_nm
        bonds = _peptide_bonds_a(x, fragment.backbone_atoms)
        assert bonds.min() > PEPTIDE_MIN_A and bonds.max() < PEPTIDE_MAX_A
        assert _ca_rmsd_a(x, fragment.backbone_atoms, target) < CA_RMSD_MAX_A
        assert result.potential_energy_kj < rigid_only.backmap(fragment.positions_nm, fragment.frames,
                                                              target).potential_energy_kj
        other = screened.backmap(fragment.positions_nm, fragment.frames, target).positions_nm
        assert np.abs(x - other).max() > 1e-3  # nm: screening changes where the minimiser goes
    assert openmm.XmlSerializer.serialize(fragment.system) == system_xml


def test_atom_layout_moves_caps_with_their_neighbours_and_leaves_water(capped_pdb, ubiquitin_pdb):
    capped = app.PDBFile(str(capped_pdb))
    protein = extract_protein(capped.topology, capped.positions)
    atom_residue, backbone = atom_layout(capped.topology, protein.topology_residue_index)
    residues = list(capped.topology.residues())
    assert residues[0].name == "ACE" and residues[-1].name == "NME"
    assert all(atom_residue[a.index] == 0 for a in residues[0].atoms())
    assert all(atom_residue[a.index] == len(protein) - 1 for a in residues[-1].atoms())
    assert np.all(atom_residue >= 0)
    names = [[a.name for a in capped.topology.atoms()][i] for i in backbone.reshape(-1)]
    assert names == ["N", "CA", "C"] * len(protein)

    with_water = app.PDBFile(str(ubiquitin_pdb))
    protein = extract_protein(with_water.topology, with_water.positions)
    atom_residue, _ = atom_layout(with_water.topology, protein.topology_residue_index)
    for atom in with_water.topology.atoms():
        assert (atom_residue[atom.index] == -1) == (atom.residue.name == "HOH")


def test_invalid_arguments_are_named(fragment):
    with pytest.raises(ValueError, match="backmap mode 'fast'"):
        Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="fast")
    with pytest.raises(ValueError, match="restrain='all'"):
        Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, restrain="all")
    with pytest.raises(ValueError, match="dielectric=0.5 must be a finite number >= 1"):
        Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, dielectric=0.5)
    with pytest.raises(ValueError, match="screen='backbone' is not known"):
        Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, screen="backbone")
    with pytest.raises(ValueError, match="applies to mode='vacuum' only"):
        Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="system", dielectric=4)
    assert Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms, mode="system").dielectric == 1.0
    assert Backmapper(fragment.system, fragment.atom_residue, fragment.backbone_atoms).dielectric == VACUUM_DIELECTRIC
    with pytest.raises(ValueError, match="atom_residue has 3 entries"):
        Backmapper(fragment.system, [0, 0, 0], fragment.backbone_atoms)
