"""Cα validity, energy validity and validity along time on real structures with planted faults."""

import mdtraj as md
import numpy as np
import openmm.unit as unit
import pytest

from openmm_starmd.analysis.validity import (broken_pairs, ca_breaks, ca_clashes, ca_validity,
                                             energy_validity, validity_over_time)


def _frames(ca_structure, n):
    return md.Trajectory(np.repeat(ca_structure.xyz, n, axis=0), ca_structure.topology)


def _along_bond(traj, k, length):
    """Vector of ``length`` nm along the Cα(k-1) -> Cα(k) bond of frame 0."""
    v = traj.xyz[0, k] - traj.xyz[0, k - 1]
    return (length * v / np.linalg.norm(v)).astype(np.float32)


def _two_chains(ca_structure, split):
    """The Cα structure as two chains, the second starting at residue ``split``."""
    top = md.Topology()
    chains = [top.add_chain(), top.add_chain()]
    for k, res in enumerate(ca_structure.topology.residues):
        r = top.add_residue(res.name, chains[int(k >= split)], res.resSeq)
        top.add_atom("CA", md.element.carbon, r)
    return md.Trajectory(ca_structure.xyz.copy(), top)


def test_real_structure_is_valid(ca_structure, structure):
    for traj in (ca_structure, structure):
        v = ca_validity(traj)
        assert v.valid.all() and not v.clash.any() and not v.broken.any()


def test_planted_clash_flagged_at_its_frame(ca_structure):
    traj = _frames(ca_structure, 5)
    a, b = 5, 30
    direction = traj.xyz[3, b] - traj.xyz[3, a]
    direction /= np.linalg.norm(direction)
    # Move the whole C-terminal stretch from b on, so b lands 0.25 nm from a without breaking
    # b-1/b more than the clash does: only the clash flag is asserted here.
    traj.xyz[3, b] = traj.xyz[3, a] + 0.25 * direction
    clash = ca_clashes(traj)
    assert clash.tolist() == [False, False, False, True, False]


def test_planted_break_flagged_at_its_frame(ca_structure):
    traj = _frames(ca_structure, 6)
    k = 20
    traj.xyz[2, k:] += _along_bond(traj, k, 0.2)  # rigid shift of the C-terminal part: one gap
    broken = ca_breaks(traj)
    assert broken.tolist() == [False, False, True, False, False, False]
    v = ca_validity(traj)
    assert v.valid.tolist() == [True, True, False, True, True, True]
    assert not v.clash.any()


def test_break_across_chains_is_not_a_break(ca_structure):
    split = 20
    traj = _two_chains(ca_structure, split)
    traj.xyz[0, split:] += _along_bond(traj, split, 1.5)
    assert not ca_breaks(traj).any()
    # the same shift inside one chain is a break
    one = _frames(ca_structure, 1)
    one.xyz[0, split:] += _along_bond(one, split, 1.5)
    assert ca_breaks(one).all()


def test_sequence_neighbours_at_cis_distance_are_not_clashes(ca_structure):
    traj = _frames(ca_structure, 1)
    k = 10
    shift = traj.xyz[0, k + 1] - traj.xyz[0, k]
    shift *= 1 - 0.29 / np.linalg.norm(shift)  # bring k+1 to 0.29 nm from k (a cis peptide)
    traj.xyz[0, k + 1:] -= shift
    d = np.linalg.norm(traj.xyz[0, k + 1] - traj.xyz[0, k])
    assert d == pytest.approx(0.29, abs=1e-5)
    assert not ca_clashes(traj).any()
    assert not ca_validity(traj).broken.any()


def test_gaps_in_initial_structure_can_be_exempted(ca_structure):
    traj = _frames(ca_structure, 3)
    traj.xyz[:, 25:] += _along_bond(traj, 25, 0.5)  # a gap in every frame
    gaps = broken_pairs(traj, 0)
    assert gaps.tolist() == [[24, 25]]
    assert ca_breaks(traj).all()
    assert not ca_breaks(traj, ignore_pairs=gaps).any()


def test_validity_is_invariant_to_rigid_motion(ca_structure, random_rotations):
    rng = np.random.default_rng(3)
    traj = _frames(ca_structure, 4)
    traj.xyz[1, 12:] += _along_bond(traj, 12, 0.15)
    traj.xyz[2] += rng.normal(scale=0.06, size=traj.xyz[2].shape).astype(np.float32)
    before = ca_validity(traj)
    rots = random_rotations(4, rng)
    moved = traj.xyz @ np.transpose(rots, (0, 2, 1)).astype(np.float32) + 3.0
    after = ca_validity(md.Trajectory(moved, traj.topology))
    for a, b in zip(before, after):
        assert a.tolist() == b.tolist()


def test_energy_validity_uses_reference_percentile_and_units():
    ref = np.linspace(-1000.0, -900.0, 101)  # 99th percentile: -901 kJ/mol
    gen = np.array([-950.0, -901.5, -900.5, np.nan])
    assert energy_validity(gen, ref).tolist() == [True, True, False, False]
    gen_q = unit.Quantity(gen / 4.184, unit.kilocalorie_per_mole)
    ref_q = unit.Quantity(ref, unit.kilojoule_per_mole)
    assert energy_validity(gen_q, ref_q).tolist() == [True, True, False, False]


def test_validity_over_time_blocks():
    valid = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    start, frac = validity_over_time(valid, dt_ns=0.5, n_blocks=5)
    np.testing.assert_allclose(start, [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(frac, [1.0, 1.0, 0.0, 0.5, 0.0])
