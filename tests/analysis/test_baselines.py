"""ANM and Gaussian-noise baselines built on a real structure."""

import numpy as np
import pytest

from openmm_starmd.analysis.alignment import ca_xyz
from openmm_starmd.analysis.baselines import (anm_ensemble, anm_hessian, anm_modes,
                                              gaussian_ensemble)
from openmm_starmd.analysis.coverage import rmsf


@pytest.fixture(scope="module")
def x0(ca_structure):
    return ca_xyz(ca_structure)[0]


def test_anm_hessian_has_exactly_six_rigid_modes(x0):
    h = anm_hessian(x0)
    np.testing.assert_allclose(h, h.T, atol=1e-12)
    lam = np.linalg.eigvalsh(h)
    assert np.all(lam > -1e-9)
    assert (lam < 1e-8 * lam.max()).sum() == 6
    # rigid translations cost nothing
    t = np.tile([1.0, 0.0, 0.0], len(x0))
    np.testing.assert_allclose(h @ t, 0.0, atol=1e-10)


def test_anm_modes_are_rotation_equivariant(x0, random_rotations):
    rot = random_rotations(1, np.random.default_rng(0))[0]
    lam, modes = anm_modes(x0)
    lam_r, modes_r = anm_modes(x0 @ rot.T + 1.0)
    assert len(lam) == 3 * len(x0) - 6
    np.testing.assert_allclose(lam_r, lam, rtol=1e-8)
    # the softest mode (non-degenerate) rotates with the structure, up to sign
    overlap = abs(np.sum(modes_r[0] * (modes[0] @ rot.T)))
    assert overlap == pytest.approx(1.0, abs=1e-6)


def test_anm_amplitude_matches_md_total_fluctuation(ca_structure, x0):
    target = np.linspace(0.03, 0.15, len(x0))
    traj = anm_ensemble(ca_structure, target, 3000, dt_ns=0.5, seed=1)
    assert traj.n_atoms == len(x0) and traj.n_frames == 3000
    np.testing.assert_allclose(traj.time[:3], [0.0, 500.0, 1000.0])
    got = rmsf(traj, x0)
    assert np.sum(got**2) == pytest.approx(np.sum(target**2), rel=0.05)
    # the profile is the ANM's own, not copied from MD
    assert not np.allclose(got, target, rtol=0.1)


def test_gaussian_baseline_matches_md_rmsf_per_residue(ca_structure, x0):
    target = np.linspace(0.03, 0.15, len(x0))
    traj = gaussian_ensemble(ca_structure, target, 4000, dt_ns=1.0, seed=2)
    # the per-residue amplitude is planted; superposition blurs it slightly
    np.testing.assert_allclose(rmsf(traj, x0), target, rtol=0.2)
    assert np.corrcoef(rmsf(traj, x0), target)[0, 1] > 0.98


def test_baselines_are_seeded(ca_structure, x0):
    target = np.full(len(x0), 0.05)
    for make in (anm_ensemble, gaussian_ensemble):
        a, b = make(ca_structure, target, 20, seed=3), make(ca_structure, target, 20, seed=3)
        c = make(ca_structure, target, 20, seed=4)
        np.testing.assert_array_equal(a.xyz, b.xyz)
        assert not np.allclose(a.xyz, c.xyz)


def test_rmsf_shape_mismatch_is_a_clear_error(ca_structure):
    with pytest.raises(ValueError, match="same protein"):
        gaussian_ensemble(ca_structure, np.ones(3), 5)
