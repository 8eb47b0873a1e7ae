"""Dynamics metrics on constructed stochastic trajectories of a real structure."""

import numpy as np
import pytest

from openmm_starmd.analysis.alignment import ca_xyz
from openmm_starmd.analysis.coverage import pca_project
from openmm_starmd.analysis.dynamics import (autocorrelation, compare_dynamics,
                                             decorrelation_time, fit_tica, rmsd_vs_lag,
                                             tica_project, valid_segments, vamp2_score)
from openmm_starmd.analysis.inputs import InputError


def _ar1(n, phi, rng):
    z = np.zeros(n)
    e = rng.standard_normal(n) * np.sqrt(1 - phi**2)
    for t in range(1, n):
        z[t] = phi * z[t - 1] + e[t]
    return z


def _modes(x0, k, rng):
    m = rng.standard_normal((k, x0.size))
    m -= m.mean(axis=1, keepdims=True)
    q, _ = np.linalg.qr(m.T)
    return q.T.reshape(k, *x0.shape)


@pytest.fixture(scope="module")
def x0(ca_structure):
    return ca_xyz(ca_structure)[0]


def _trajectory(x0, n, seed, phi_slow=0.98, phi_fast=0.2, amp_slow=0.3, amp_fast=0.9):
    """x0 moved along a slow (small) and a fast (large) mode, plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    slow, fast = _modes(x0, 2, np.random.default_rng(99))
    zs, zf = _ar1(n, phi_slow, rng), _ar1(n, phi_fast, rng)
    xyz = x0 + amp_slow * zs[:, None, None] * slow + amp_fast * zf[:, None, None] * fast
    return xyz + rng.normal(scale=0.005, size=xyz.shape), zs


def test_valid_segments():
    v = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    assert valid_segments(v) == [(0, 2), (3, 6), (8, 9)]
    assert valid_segments(v, min_length=3) == [(3, 6)]


def test_autocorrelation_and_decorrelation_time_of_ar1():
    phi, dt = 0.9, 0.1
    z = _ar1(40000, phi, np.random.default_rng(0))
    lags = np.arange(1, 30)
    acf = autocorrelation(z, lags, center=0.0)
    np.testing.assert_allclose(acf[:10], phi ** lags[:10], atol=0.03)
    tau = decorrelation_time(lags * dt, acf)
    # the estimated ACF has ~0.02 noise where it crosses 1/e, i.e. about half a lag step
    assert tau == pytest.approx(-dt / np.log(phi), rel=0.08)


def test_autocorrelation_ignores_invalid_frames():
    rng = np.random.default_rng(1)
    z = _ar1(3000, 0.8, rng)
    valid = rng.random(3000) > 0.2
    garbage = z.copy()
    garbage[~valid] = 1e6
    lags = np.arange(0, 8)
    np.testing.assert_allclose(autocorrelation(garbage, lags, valid),
                               autocorrelation(np.where(valid, z, -7.0), lags, valid))
    assert autocorrelation(z, np.array([0]), valid)[0] == pytest.approx(1.0)
    sparse = rng.random(3000) > 0.7  # few valid pairs: the estimate must still be a correlation
    assert np.all(np.abs(autocorrelation(z, np.arange(1, 50), sparse)) <= 1.0 + 1e-12)


def test_tica_finds_the_slow_mode_not_the_large_one(x0):
    xyz, zs = _trajectory(x0, 3000, 2)
    model = fit_tica(xyz, dt_ns=0.1, lag_ns=0.5, n_pcs=8)
    tic0 = tica_project(model, xyz)[:, 0]
    assert abs(np.corrcoef(tic0, zs)[0, 1]) > 0.95
    first_pc = pca_project(model.pca, xyz, 1)[:, 0]
    assert abs(np.corrcoef(first_pc, zs)[0, 1]) < 0.5  # PC1 is the large fast mode


def test_lags_are_in_ns_not_frames(x0):
    xyz, _ = _trajectory(x0, 4000, 3, phi_slow=0.97)
    fine = compare_dynamics(xyz, xyz, dt_ns=0.1, reference_dt_ns=0.1, lag_ns=0.4, n_pcs=8)
    # the same process saved half as often: time scales in ns must not change
    coarse = compare_dynamics(xyz, xyz[::2], dt_ns=0.2, reference_dt_ns=0.1, lag_ns=0.4,
                              n_pcs=8)
    s = coarse.scalars
    assert s["tic0_decorrelation_ns_generated"] == pytest.approx(
        fine.scalars["tic0_decorrelation_ns_reference"], rel=0.15)
    assert s["tic0_acf_pearson_r"] > 0.98
    assert s["rmsd_vs_lag_deviation_nm"] < 0.1 * np.nanmean(coarse.rmsd_lag_ref)


def test_identical_trajectories_have_zero_deviation(x0):
    xyz, _ = _trajectory(x0, 600, 4)
    d = compare_dynamics(xyz, xyz, dt_ns=1.0, reference_dt_ns=1.0, lag_ns=2.0, n_pcs=8)
    s = d.scalars
    assert s["tic0_jsd"] == pytest.approx(0.0, abs=1e-12)
    assert s["tic0_acf_pearson_r"] == pytest.approx(1.0)
    for key in ("tic0_acf_deviation", "pc_acf_deviation", "rmsd_vs_lag_deviation_nm",
                "vamp2_deviation"):
        assert s[key] == pytest.approx(0.0, abs=1e-9), key


def test_white_noise_differs_from_slow_dynamics(x0):
    ref, _ = _trajectory(x0, 2000, 5)
    rng = np.random.default_rng(6)
    shuffled = ref[rng.permutation(len(ref))]  # same ensemble, no time correlation
    s = compare_dynamics(ref, shuffled, 1.0, 1.0, lag_ns=3.0, n_pcs=8).scalars
    assert s["tic0_jsd"] < 0.02  # the distribution is identical...
    assert s["tic0_acf_at_lag_reference"] > 0.8 and abs(s["tic0_acf_at_lag_generated"]) < 0.1
    assert s["vamp2_generated"] < s["vamp2_reference"] - 0.5  # ...the dynamics are not
    assert s["tic0_decorrelation_ns_generated"] < 1.0 < s["tic0_decorrelation_ns_reference"]


def test_rmsd_vs_lag(x0):
    still = np.repeat(x0[None], 20, axis=0)
    np.testing.assert_allclose(rmsd_vs_lag(still, np.array([1, 5])), 0.0, atol=1e-7)
    xyz, _ = _trajectory(x0, 2000, 7, phi_fast=0.0)
    curve = rmsd_vs_lag(xyz, np.array([1, 10, 100]))
    assert curve[0] < curve[1] < curve[2]


def test_vamp2_bounds(x0):
    rng = np.random.default_rng(8)
    white = rng.standard_normal((3000, 4))
    assert 1.0 <= vamp2_score(white, 1) < 1.05
    slow = np.stack([_ar1(3000, 0.95, rng) for _ in range(4)], axis=1)
    assert 4.0 < vamp2_score(slow, 1) <= 5.0 + 1e-9


def test_too_few_frames_for_the_lag_is_a_clear_error(x0):
    xyz, _ = _trajectory(x0, 10, 9)
    with pytest.raises(InputError, match=r"10 frames .* too few .*TICA lag.*--tica-lag-ns"):
        fit_tica(xyz, dt_ns=0.1, lag_ns=1.0, label="reference 'md.dcd'")
    with pytest.raises(InputError, match="generated"):
        compare_dynamics(np.concatenate([xyz] * 10), xyz, 0.1, 0.1, lag_ns=1.0)
