"""Coverage metrics on constructed ensembles of a real structure with known answers."""

import mdtraj as md
import numpy as np
import pytest

from openmm_starmd.analysis.alignment import ca_xyz
from openmm_starmd.analysis.coverage import (contact_jaccard, contact_probabilities, fit_pca,
                                             histogram_jsd, mean_pairwise_rmsd, pca_jsd,
                                             pca_project, pca_recall, pca_w2, rmsf,
                                             rmsf_correlation)


@pytest.fixture(scope="module")
def x0(ca_structure):
    return ca_xyz(ca_structure)[0]


def _ensemble(x0, n, seed, scale=None):
    """Noisy copies of x0 with per-residue amplitudes ``scale`` (nm), each randomly moved."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.02, 0.12, len(x0)) if scale is None else scale
    return x0 + rng.standard_normal((n, len(x0), 3)) * scale[None, :, None]


def _rigidly_moved(xyz, seed, random_rotations):
    rng = np.random.default_rng(seed)
    rots = random_rotations(len(xyz), rng)
    return np.einsum("fij,fnj->fni", rots, xyz) + rng.normal(size=(len(xyz), 1, 3))


def test_rigid_rotations_of_a_structure_have_zero_rmsf(x0, random_rotations):
    frames = _rigidly_moved(np.repeat(x0[None], 12, axis=0), 0, random_rotations)
    np.testing.assert_allclose(rmsf(frames), 0.0, atol=1e-7)
    np.testing.assert_allclose(mean_pairwise_rmsd(frames), 0.0, atol=1e-7)


def test_rmsf_recovers_planted_amplitude(x0):
    sigma = 0.05
    ens = _ensemble(x0, 4000, 1, np.full(len(x0), sigma))
    # isotropic noise of per-axis sigma has RMSF sqrt(3) sigma; superposition removes the 6
    # rigid-body degrees of freedom of the 3N, shrinking the mean-square by (3N - 6) / 3N.
    n = len(x0)
    expected = np.sqrt(3) * sigma * np.sqrt((3 * n - 6) / (3 * n))
    got = rmsf(ens, x0)
    assert np.sqrt((got**2).mean()) == pytest.approx(expected, rel=0.01)
    np.testing.assert_allclose(got, expected, rtol=0.06)


def test_rmsf_correlation_independent_of_rigid_motion(x0, random_rotations):
    ref = _ensemble(x0, 300, 2)
    gen = _ensemble(x0, 300, 3)
    r = rmsf_correlation(ref, gen)
    assert r > 0.9
    moved = _rigidly_moved(gen, 5, random_rotations)
    assert rmsf_correlation(ref, moved) == pytest.approx(r, abs=1e-9)


def test_identical_ensembles_score_perfectly(x0, random_rotations):
    ref = _ensemble(x0, 200, 4)
    gen = _rigidly_moved(ref, 6, random_rotations)  # same ensemble, every frame moved
    np.testing.assert_allclose(pca_jsd(ref, gen), 0.0, atol=1e-12)
    np.testing.assert_allclose(pca_recall(ref, gen), 1.0)
    assert pca_w2(ref, gen) == pytest.approx(0.0, abs=1e-6)
    assert pca_w2(ref, gen, max_samples=50) == pytest.approx(0.0, abs=1e-6)  # subsampled
    j = contact_jaccard(ref, gen)
    assert j.weak == pytest.approx(1.0) and j.transient == pytest.approx(1.0)
    assert rmsf_correlation(ref, gen) == pytest.approx(1.0)


def test_disjoint_projections_have_jsd_one_and_recall_zero(x0):
    ref = _ensemble(x0, 200, 7, np.full(len(x0), 0.01))
    pca = fit_pca(ref)
    shift = 5.0 * np.sqrt(pca.variance[0]) * 20 * pca.components[0].reshape(-1, 3)
    gen = ref + shift
    assert pca_jsd(ref, gen, pca=pca, n_pcs=1)[0] == pytest.approx(1.0)
    assert pca_recall(ref, gen, pca=pca, n_pcs=1)[0] == pytest.approx(0.0)


def test_w2_of_a_shift_along_pc1_is_the_shift_in_rmsd_units(x0):
    ref = _ensemble(x0, 150, 8)
    pca = fit_pca(ref)
    d = 0.3  # nm along PC1 in the 3N-dimensional space
    gen = ref + d * pca.components[0].reshape(-1, 3)
    # the translated ensemble re-aligns onto x0 slightly differently; a 1% tolerance covers it
    assert pca_w2(ref, gen, pca=pca) == pytest.approx(d / np.sqrt(len(x0)), rel=0.01)


def test_histogram_jsd_known_value():
    a = np.zeros(100)
    b = np.concatenate([np.zeros(50), np.ones(50)])
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4): JSD = (KL(P|M) + KL(Q|M)) / 2 in bits
    m = np.array([0.75, 0.25])
    kl_p = np.log2(1 / m[0])
    kl_q = 0.5 * np.log2(0.5 / m[0]) + 0.5 * np.log2(0.5 / m[1])
    expected = 0.5 * (kl_p + kl_q)
    assert histogram_jsd(a, b, bins=2) == pytest.approx(expected)


def test_weak_and_transient_contacts_follow_definitions():
    # four beads on a line, 0.5 nm apart: pairs (0,1),(1,2),(2,3) in contact initially
    init = np.array([[0.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [1.5, 0, 0]])
    far = init.copy()
    far[3] = [2.2, 0, 0]    # breaks contact (2,3)
    near = init.copy()
    near[3] = [1.3, 0, 0]   # makes contact (1,3): 0.8 -> 0.8? use 0.7
    near[3] = [1.2, 0, 0]   # (1,3) at 0.7 nm: a new contact
    ref = np.stack([init] * 5 + [far] * 5)              # (2,3) in 50%: weak; no transient
    gen = np.stack([init] * 6 + [far] * 2 + [near] * 2)  # (2,3) in 80%: weak; (1,3) 20%: transient
    p = contact_probabilities(gen)
    assert p[2, 3] == pytest.approx(0.8) and p[1, 3] == pytest.approx(0.2)
    j = contact_jaccard(ref, gen, initial=init[None])
    assert j.weak == pytest.approx(1.0)
    assert j.transient == pytest.approx(0.0)
    j2 = contact_jaccard(ref, ref, initial=init[None])
    assert np.isnan(j2.transient)  # both transient sets empty: 0/0


def test_pca_projection_of_reference_has_decreasing_variance(x0):
    ref = _ensemble(x0, 300, 9)
    pca = fit_pca(ref, n_components=5)
    proj = pca_project(pca, ref)
    var = proj.var(axis=0, ddof=1)
    np.testing.assert_allclose(var, pca.variance, rtol=1e-8)
    assert np.all(np.diff(var) <= 0)


def test_metrics_accept_trajectories(ca_structure, x0):
    ens = _ensemble(x0, 50, 10).astype(np.float32)
    traj = md.Trajectory(ens, ca_structure.topology)
    np.testing.assert_allclose(rmsf(traj), rmsf(ens), atol=1e-5)
    assert pca_jsd(traj, traj).max() == 0.0
