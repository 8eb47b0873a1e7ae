"""All-atom validity against criteria fitted on a real MD run, with planted faults."""

import mdtraj as md
import numpy as np
import pytest

from openmm_starmd.analysis.stereochemistry import (allatom_validity, backbone_dihedrals,
                                                    fit_allatom_criteria,
                                                    heavy_atom_clashscore, is_all_atom,
                                                    peptide_bond_lengths,
                                                    ramachandran_classes,
                                                    sidechain_dihedrals)

BACKBONE = {"N", "H", "H1", "H2", "H3", "CA"}


def _rotate(xyz, moving, origin, axis, angle):
    """Rotate atoms ``moving`` of one frame by ``angle`` about the axis through ``origin``."""
    k = axis / np.linalg.norm(axis)
    p = xyz[moving] - origin
    cos, sin = np.cos(angle), np.sin(angle)
    xyz[moving] = (p * cos + np.cross(k, p) * sin + np.outer(p @ k, k) * (1 - cos)) + origin


def _set_dihedral(traj, frame, quad, moving, target, measure):
    """Set the dihedral ``quad`` of ``frame`` to ``target`` by rotating atoms ``moving``."""
    xyz = traj.xyz[frame].astype(np.float64)
    b, c = xyz[quad[1]], xyz[quad[2]]
    current = measure(traj, frame)
    for sign in (1.0, -1.0):
        trial = xyz.copy()
        _rotate(trial, moving, b, c - b, sign * (target - current))
        test = traj[frame]
        test.xyz[0] = trial
        if abs(np.angle(np.exp(1j * (measure(test, 0) - target)))) < 1e-3:
            traj.xyz[frame] = trial
            return
    raise AssertionError("could not set dihedral")


def _downstream(top, res_index, keep):
    """Atoms of residue ``res_index`` not in ``keep``, plus all atoms of later residues."""
    return np.array([a.index for a in top.atoms
                     if a.residue.index > res_index
                     or (a.residue.index == res_index and a.name not in keep)])


def _plant_ramachandran_outlier(traj, frame, pos, phi_deg=100.0, psi_deg=-100.0):
    """Set (φ, ψ) of the residue at Cα-list position ``pos`` to an empty region."""
    top = traj.topology
    res = [a.residue for a in top.atoms if a.name == "CA"][pos]
    prev_c = [a.index for a in top.residue(res.index - 1).atoms if a.name == "C"][0]
    n, ca, c = (res.atom(x).index for x in ("N", "CA", "C"))
    nxt_n = top.residue(res.index + 1).atom("N").index
    _set_dihedral(traj, frame, (prev_c, n, ca, c), _downstream(top, res.index, BACKBONE),
                  np.radians(phi_deg), lambda t, f: backbone_dihedrals(t[f])[0][0, pos])
    _set_dihedral(traj, frame, (n, ca, c, nxt_n),
                  _downstream(top, res.index, BACKBONE | {"HA", "HA2", "HA3", "CB", "C"} |
                              {a.name for a in res.atoms if a.name not in ("O", "OXT")}),
                  np.radians(psi_deg), lambda t, f: backbone_dihedrals(t[f])[1][0, pos])


@pytest.fixture(scope="module")
def criteria(md_pair):
    return fit_allatom_criteria(md_pair[0])


def test_md_structure_is_all_atom(md_pair, ca_only):
    assert is_all_atom(md_pair[0].topology)
    assert not is_all_atom(ca_only(md_pair[0]).topology)


def test_reference_outlier_rate_is_one_percent_by_construction(md_pair, criteria):
    ref = md_pair[0]
    out, judged = criteria.dihedrals.ramachandran_outliers(ref)
    rate = out[:, judged].mean()
    assert 0.0 < rate <= 0.03
    v = allatom_validity(ref, criteria)
    # frame thresholds sit at the reference's 99th percentile: nearly every frame passes them
    assert v.rama_ok.mean() >= 0.97 and v.rotamer_ok.mean() >= 0.97 and v.clash_ok.mean() >= 0.97


def test_planted_ramachandran_outlier_flagged_at_right_frame_and_residue(md_pair, criteria):
    traj = md_pair[1][:4]
    traj = md.Trajectory(traj.xyz.copy(), traj.topology)
    classes = ramachandran_classes(traj.topology)
    before, judged = criteria.dihedrals.ramachandran_outliers(traj)
    candidates = [k for k in range(2, traj.n_residues - 2)
                  if classes[k] == "GENERAL" and judged[k] and not before[:, k].any()]
    planted = candidates[:6]
    for pos in planted:
        _plant_ramachandran_outlier(traj, 2, pos)
    phi, psi = backbone_dihedrals(traj)
    np.testing.assert_allclose(np.degrees(phi[2, planted]), 100.0, atol=0.1)
    np.testing.assert_allclose(np.degrees(psi[2, planted]), -100.0, atol=0.1)
    after, _ = criteria.dihedrals.ramachandran_outliers(traj)
    assert after[2, planted].all()
    assert not after[[0, 1, 3]][:, planted].any()
    v = allatom_validity(traj, criteria)
    assert not v.rama_ok[2] and not v.valid[2]
    assert v.rama_fraction[2] > v.rama_fraction[[0, 1, 3]].max()


def test_planted_rotamer_outlier_flagged(md_pair, criteria):
    traj = md.Trajectory(md_pair[1].xyz[:3].copy(), md_pair[1].topology)
    chi1, _ = sidechain_dihedrals(traj)
    names = [a.residue.name for a in traj.topology.atoms if a.name == "CA"]
    before, judged = criteria.dihedrals.rotamer_outliers(traj)
    pos = next(k for k in range(len(names))
               if judged[k] and not before[:, k].any() and names[k] not in ("PRO",))
    res = [a.residue for a in traj.topology.atoms if a.name == "CA"][pos]
    quad = [res.atom(x).index for x in ("N", "CA", "CB")]
    side = np.array([a.index for a in res.atoms
                     if a.name not in ("N", "H", "CA", "HA", "C", "O", "CB", "OXT")])
    # χ1 = 0° eclipses the side chain with N: essentially never seen in MD.
    _set_dihedral(traj, 1, quad + [side[0]], side, 0.0,
                  lambda t, f: sidechain_dihedrals(t[f])[0][0, pos])
    after, _ = criteria.dihedrals.rotamer_outliers(traj)
    assert after[1, pos] and not after[0, pos] and not after[2, pos]


def test_stretched_peptide_bond_flagged_at_its_frame(md_pair, criteria):
    traj = md.Trajectory(md_pair[1].xyz[:3].copy(), md_pair[1].topology)
    top = traj.topology
    res = list(top.residues)[10]
    c = res.atom("C").index
    n = top.residue(res.index + 1).atom("N").index
    bond = traj.xyz[1, n] - traj.xyz[1, c]
    later = np.array([a.index for a in top.atoms if a.residue.index > res.index])
    traj.xyz[1, later] += 0.04 * bond / np.linalg.norm(bond)
    lengths = peptide_bond_lengths(traj)
    assert lengths[1].max() > 0.16
    v = allatom_validity(traj, criteria)
    assert not v.peptide_ok[1]
    # the MD frames themselves pass or fail on their own thermal bonds, unchanged
    untouched = allatom_validity(md.Trajectory(md_pair[1].xyz[:3], top), criteria).peptide_ok
    assert v.peptide_ok[[0, 2]].tolist() == untouched[[0, 2]].tolist()


def test_planted_heavy_atom_clash_raises_clashscore(structure):
    traj = md.Trajectory(np.repeat(structure.xyz, 3, axis=0), structure.topology)
    top = traj.topology
    heavy = [a for a in top.atoms if a.element.symbol == "C" and a.name == "CB"]
    a, b = heavy[1], heavy[-2]
    traj.xyz[1, a.index] = traj.xyz[1, b.index] + np.array([0.25, 0.0, 0.0], dtype=np.float32)
    score = heavy_atom_clashscore(traj)
    assert score[1] > score[0] and score[0] == score[2]


def test_crystal_disulfides_and_bonded_atoms_are_not_clashes(structure):
    # A well-refined crystal structure (with its covalent geometry and disulfides) has
    # few serious clashes among heavy atoms.
    n_heavy = sum(a.element.symbol != "H" for a in structure.topology.atoms)
    assert heavy_atom_clashscore(structure)[0] * n_heavy / 1000.0 <= 2


def test_allatom_validity_invariant_to_rigid_motion(md_pair, criteria, random_rotations):
    traj = md_pair[1][:5]
    rots = random_rotations(5, np.random.default_rng(4))
    moved = md.Trajectory(traj.xyz @ np.transpose(rots, (0, 2, 1)).astype(np.float32) - 2.0,
                          traj.topology)
    a, b = allatom_validity(traj, criteria), allatom_validity(moved, criteria)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=1e-6)


def test_peptide_bond_limit_lets_the_md_oracle_pass(md_pair):
    """The C-N limit is never below 0.140 nm and never fails more than 1% of the oracle's own frames."""
    ref, _ = md_pair
    crit = fit_allatom_criteria(ref, peptide_bond_nm=0.140)
    assert crit.peptide_bond_nm >= 0.140
    longest = peptide_bond_lengths(ref).max(axis=1)
    # interpolated 99th percentile: at most ceil(1% of frames) lie above it
    assert (longest > crit.peptide_bond_nm).sum() <= np.ceil(0.01 * len(longest))
    # a strict absolute limit below thermal fluctuation is raised to the oracle's 99th percentile
    strict = fit_allatom_criteria(ref, peptide_bond_nm=0.130)
    assert strict.peptide_bond_nm == pytest.approx(np.percentile(longest, 99))
