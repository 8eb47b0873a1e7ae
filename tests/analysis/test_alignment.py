"""Kabsch superposition and superposed RMSD: exactness on rigid motions, no reflections."""

import numpy as np

from openmm_starmd.analysis.alignment import (aligned_ca, ca_xyz, kabsch_superpose,
                                              superposed_rmsd)


def test_superpose_undoes_random_rigid_motions(ca_structure, random_rotations):
    rng = np.random.default_rng(0)
    x0 = ca_xyz(ca_structure)[0]
    rots = random_rotations(8, rng)
    moved = np.einsum("fij,nj->fni", rots, x0) + rng.normal(size=(8, 1, 3)) * 5.0
    back = kabsch_superpose(moved, x0)
    np.testing.assert_allclose(back, np.broadcast_to(x0, back.shape), atol=1e-9)
    np.testing.assert_allclose(superposed_rmsd(moved, np.broadcast_to(x0, moved.shape)), 0,
                               atol=1e-9)


def test_mirror_image_is_not_superposable(ca_structure):
    x0 = ca_xyz(ca_structure)[0]
    mirror = x0 * np.array([-1.0, 1.0, 1.0])
    assert superposed_rmsd(mirror[None], x0[None])[0] > 0.1


def test_rmsd_matches_direct_formula_for_aligned_pair(ca_structure):
    rng = np.random.default_rng(1)
    x0 = ca_xyz(ca_structure)[0]
    noisy = x0 + rng.normal(scale=0.05, size=x0.shape)
    fitted = kabsch_superpose(noisy[None], x0)[0]
    direct = np.sqrt(((fitted - x0) ** 2).sum(-1).mean())
    np.testing.assert_allclose(superposed_rmsd(noisy[None], x0[None])[0], direct, rtol=1e-10)
    # the fit can only lower the RMSD of the unfitted pair
    assert direct <= np.sqrt(((noisy - x0) ** 2).sum(-1).mean()) + 1e-12


def test_aligned_ca_selects_ca_of_all_atom_trajectory(structure, ca_structure):
    x0 = ca_xyz(ca_structure)[0]
    np.testing.assert_allclose(aligned_ca(structure, x0)[0], x0, atol=1e-6)
