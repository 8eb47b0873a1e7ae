"""IGSO(3) in openmm_starmd/geometry/igso3.py: normalisation, agreement of the two exact forms,
limits (Gaussian on so(3) at small sigma, Haar at large sigma), sampling law (KS against an
independently integrated CDF), the score against autograd and against a manifold finite difference,
and the expected squared score norm."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from openmm_starmd.geometry import igso3
from openmm_starmd.geometry.igso3 import IGSO3Table, igso3_table
from openmm_starmd.geometry.so3 import exp_map, log_map, random_rotations, rotation_angle

F64 = torch.float64


@pytest.fixture(scope="module")
def table():
    return igso3_table(0.05, 2.0)


def _angle_density_np(sigma):
    return lambda w: float(igso3.angle_density(torch.tensor(w, dtype=F64), sigma))


def _reference_cdf(sigma, n=20001):
    """Angle CDF by scipy's cumulative Simpson rule on a fine grid, independent of the table code."""
    w = np.linspace(0.0, math.pi, n)
    f = igso3.angle_density(torch.as_tensor(w), sigma).numpy()
    F = integrate.cumulative_simpson(f, x=w, initial=0.0)
    return lambda x: np.interp(x, w, F / F[-1])


@pytest.mark.parametrize("sigma", [0.03, 0.1, 0.5, 0.99, 1.0, 1.5, 2.5, 4.0])
def test_angle_density_integrates_to_one(sigma):
    total, err = integrate.quad(_angle_density_np(sigma), 0.0, math.pi, points=[min(sigma, 3.0)], limit=200)
    assert abs(total - 1.0) < 1e-9, (total, err)


@pytest.mark.parametrize("sigma", [0.4, 0.7, 0.9, 1.0, 1.2])
def test_closed_form_and_series_agree_where_both_are_accurate(sigma):
    omega = torch.linspace(0.0, math.pi, 201, dtype=F64)
    closed = igso3.closed_form_log_density(omega, sigma)
    series = torch.log(igso3.series_density(omega, sigma, l_max=400))
    # The series loses ~1e-14 / p relative to cancellation: compare where p > e^-10.
    ok = series > -10
    torch.testing.assert_close(closed[ok], series[ok], rtol=0, atol=1e-8)


def test_log_density_is_continuous_across_the_switch():
    omega = torch.linspace(0.0, math.pi, 101, dtype=F64)
    below = igso3.log_density(omega, math.nextafter(igso3.SIGMA_SWITCH, 0.0))
    at = igso3.log_density(omega, igso3.SIGMA_SWITCH)
    torch.testing.assert_close(below, at, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        igso3.d_log_density(omega, math.nextafter(igso3.SIGMA_SWITCH, 0.0)),
        igso3.d_log_density(omega, igso3.SIGMA_SWITCH),
        rtol=0,
        atol=1e-12,
    )


def test_log_density_stays_finite_in_the_far_tail():
    """Where p underflows (omega = pi, sigma = 0.05: p ~ exp(-1974)) log p and the score are exact."""
    omega = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    sigma = 0.05
    log_p = igso3.log_density(omega, sigma)
    assert torch.isfinite(log_p).all()
    # Leading behaviour: log p = log C - w^2/(2 s^2) + log(w / sin(w/2)).
    expected = (
        sigma**2 / 8
        + 0.5 * math.log(2 * math.pi)
        - 3 * math.log(sigma)
        - omega**2 / (2 * sigma**2)
        + torch.log(omega / torch.sin(omega / 2))
    )
    torch.testing.assert_close(log_p, expected, rtol=1e-14, atol=0)
    d = igso3.d_log_density(omega, sigma)
    torch.testing.assert_close(d, -omega / sigma**2 + 1 / omega - 0.5 / torch.tan(omega / 2), rtol=1e-13, atol=0)


def test_small_sigma_limit_is_an_isotropic_gaussian_on_so3():
    """Rotation vectors of IGSO(3)(sigma) have density -> N(0, sigma^2 I) on R^3 as sigma -> 0.

    Haar measure in rotation-vector coordinates is (1 - cos w)/(4 pi^2 w^2) d^3v, so the R^3 density
    is p(w) (1 - cos w)/(4 pi^2 w^2); relative deviation from the Gaussian is O(sigma^2).
    """
    for sigma, tol in [(0.1, 1e-2), (0.02, 4e-4)]:
        w = torch.linspace(1e-4, 4 * sigma, 50, dtype=F64)
        r3_density = igso3.density(w, sigma) * (1 - torch.cos(w)) / (4 * math.pi**2 * w**2)
        gauss = (2 * math.pi) ** -1.5 * sigma**-3 * torch.exp(-(w**2) / (2 * sigma**2))
        assert ((r3_density / gauss) - 1).abs().max() < tol


def test_small_sigma_samples_are_gaussian_rotation_vectors(table):
    sigma = 0.05
    g = torch.Generator().manual_seed(0)
    v = table.sample_rotvec(torch.full((20000,), sigma, dtype=F64), generator=g)
    for i in range(3):
        assert stats.kstest(v[:, i].numpy() / sigma, "norm").pvalue > 1e-3
    cov = (v.T @ v / len(v)).numpy()
    np.testing.assert_allclose(cov, sigma**2 * np.eye(3), atol=0.04 * sigma**2)


def test_large_sigma_tends_to_haar():
    omega = torch.linspace(0.0, math.pi, 401, dtype=F64)
    gaps = [
        (igso3.angle_density(omega, s) - igso3.haar_angle_density(omega)).abs().max().item()
        for s in (1.0, 2.0, 3.0, 4.0, 5.0)
    ]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-9
    torch.testing.assert_close(
        igso3.series_angle_cdf(omega, 6.0), (omega - torch.sin(omega)) / math.pi, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("sigma", [0.05, 0.1234, 0.4, 1.0, 1.6180, 2.0])
def test_sampled_angles_follow_the_density(table, sigma):
    g = torch.Generator().manual_seed(int(sigma * 1e4))
    omega = table.sample_angle(torch.full((20000,), sigma, dtype=F64), generator=g).numpy()
    assert omega.min() >= 0 and omega.max() <= math.pi
    cdf = (lambda x: igso3.series_angle_cdf(torch.as_tensor(x), sigma).numpy()) if sigma >= 1 else _reference_cdf(sigma)
    assert stats.kstest(omega, cdf).pvalue > 1e-3


def test_sampling_with_per_element_sigma(table):
    """Each element uses its own sigma: a mixed batch splits into the right per-sigma laws."""
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.07, 1.3], dtype=torch.float32).repeat(8000).reshape(8000, 2)
    omega = table.sample_angle(sigma, generator=g)
    assert omega.shape == (8000, 2) and omega.dtype == torch.float32
    assert stats.kstest(omega[:, 0].double().numpy(), _reference_cdf(0.07)).pvalue > 1e-3
    cdf_big = lambda x: igso3.series_angle_cdf(torch.as_tensor(x), 1.3).numpy()  # noqa: E731
    assert stats.kstest(omega[:, 1].double().numpy(), cdf_big).pvalue > 1e-3


def test_sampled_rotations_are_isotropic(table):
    """IGSO(3) is conjugation invariant: axes are uniform, and Q R Q^T has the same angle law."""
    g = torch.Generator().manual_seed(2)
    R = table.sample(torch.full((20000,), 0.8, dtype=F64), generator=g)
    axis = log_map(R)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    for i in range(3):
        assert stats.kstest(axis[:, i].numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3
    Q = random_rotations((), generator=g, dtype=F64)
    torch.testing.assert_close(rotation_angle(Q @ R @ Q.T), rotation_angle(R), rtol=0, atol=1e-12)


def test_sampling_is_reproducible_with_a_generator(table):
    sigma = torch.linspace(0.05, 2.0, 64)
    a = table.sample_rotvec(sigma, generator=torch.Generator().manual_seed(3))
    b = table.sample_rotvec(sigma, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (64, 3) and a.dtype == torch.float32


@pytest.mark.parametrize("sigma", [1.3, 1.77, 2.0])
def test_tabulated_cdf_matches_the_exact_series_cdf(table, sigma):
    """Exact (Simpson, ~1e-14) at grid nodes; in between, linear interpolation costs ~1e-5 in
    log(sigma) (100 points per e-fold) and ~1e-7 in omega."""
    omega = torch.linspace(0.0, math.pi, 157, dtype=F64)
    torch.testing.assert_close(table.cdf_at(omega, sigma), igso3.series_angle_cdf(omega, sigma), rtol=0, atol=3e-5)
    on_grid = table.sigmas[-1].item()
    torch.testing.assert_close(
        table.cdf_at(table.omegas, on_grid), igso3.series_angle_cdf(table.omegas, on_grid), rtol=0, atol=1e-12
    )
    assert table.normalisation_error < 1e-10


def test_analytic_and_tabulated_score_match_autograd(table):
    g = torch.Generator().manual_seed(4)
    sigma = torch.exp(torch.empty(400, dtype=F64).uniform_(math.log(0.05), math.log(2.0), generator=g))
    # Angles where the density is not negligible: within 4 sigma (the table's job is the bulk).
    omega = (torch.rand(400, generator=g, dtype=F64) * (4 * sigma).clamp(max=math.pi)).requires_grad_(True)
    (grad,) = torch.autograd.grad(igso3.log_density(omega, sigma).sum(), omega)
    omega = omega.detach()
    torch.testing.assert_close(igso3.d_log_density(omega, sigma), grad, rtol=1e-9, atol=1e-9)
    tabulated = table.d_log_density(omega, sigma)
    scale = grad.abs() + 1.0 / sigma
    assert ((tabulated - grad).abs() / scale).max() < 2e-3


def test_score_is_the_body_frame_riemannian_gradient(table):
    """d/de log p(R0^T R exp(e hat(u))) at e = 0 equals score(log(R0^T R)) . u."""
    g = torch.Generator().manual_seed(5)
    n = 256
    sigma = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(0.1), math.log(1.8), generator=g))
    R0 = random_rotations((n,), generator=g, dtype=F64)
    R = R0 @ table.sample(sigma, generator=g)
    u = torch.randn(n, 3, generator=g, dtype=F64)
    eps = 1e-6

    def log_p(Rx):
        return igso3.log_density(rotation_angle(R0.transpose(-1, -2) @ Rx), sigma)

    fd = (log_p(R @ exp_map(eps * u)) - log_p(R @ exp_map(-eps * u))) / (2 * eps)
    s = table.score(log_map(R0.transpose(-1, -2) @ R), sigma)
    scale = s.norm(dim=-1) * u.norm(dim=-1) + 1.0
    assert (((s * u).sum(-1) - fd).abs() / scale).max() < 2e-3
    exact = igso3.score_vector(log_map(R0.transpose(-1, -2) @ R), sigma)
    assert (((exact * u).sum(-1) - fd).abs() / scale).max() < 1e-6
    # The spatial-frame (left-perturbation) gradient is R s, not s.
    fd_left = (log_p(exp_map(eps * u) @ R) - log_p(exp_map(-eps * u) @ R)) / (2 * eps)
    s_spatial = (R @ exact[..., None]).squeeze(-1)
    assert (((s_spatial * u).sum(-1) - fd_left).abs() / scale).max() < 1e-6


def test_score_is_zero_at_the_identity_and_finite_near_it(table):
    v = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.0, 1e-5, 0.0]], dtype=F64)
    s = table.score(v, 0.2)
    assert torch.isfinite(s).all()
    assert s[0].abs().max() == 0
    # Near 0 the score is -(1/sigma^2 - 1/12) v + O(|v|^3).
    torch.testing.assert_close(s[1:], -v[1:] * (1 / 0.2**2 - 1 / 12), rtol=2e-4, atol=0)


@pytest.mark.parametrize("sigma", [0.07, 0.5, 1.5])
def test_expected_score_norm_matches_monte_carlo(table, sigma):
    g = torch.Generator().manual_seed(6)
    v = table.sample_rotvec(torch.full((40000,), sigma, dtype=F64), generator=g)
    sq = (igso3.score_vector(v, sigma) ** 2).sum(-1)
    mc, se = sq.mean().item(), sq.std().item() / math.sqrt(len(sq))
    assert abs(table.score_norm_sq_at(sigma).item() - mc) < 4 * se


def test_expected_score_norm_small_sigma_limit():
    t = igso3_table(0.02, 0.05)
    for sigma in (0.02, 0.03):
        assert abs(t.score_norm_sq_at(sigma).item() * sigma**2 / 3 - 1) < 1e-3


def test_out_of_range_sigma_raises(table):
    with pytest.raises(ValueError, match="outside this table's range"):
        table.sample_angle(torch.tensor([0.01]))
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        IGSO3Table(1.0, 0.5)


def test_tables_are_cached():
    assert igso3_table(0.05, 2.0) is igso3_table(0.05, 2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(table):
    sigma = torch.linspace(0.05, 2.0, 128, dtype=F64)
    v = table.sample_rotvec(sigma.cuda(), generator=torch.Generator("cuda").manual_seed(7))
    assert v.is_cuda and v.shape == (128, 3)
    torch.testing.assert_close(table.score(v, sigma.cuda()).cpu(), table.score(v.cpu(), sigma))


def test_nan_rotation_gives_nan_score_not_an_index_error():
    """A diverged network hands NaN rotations to the score lookup; NaN must propagate."""
    table = igso3_table(0.1, 1.5)
    rotvec = torch.tensor([[float("nan"), 0.0, 0.0], [0.1, 0.2, 0.0]], dtype=torch.float64)
    score = table.score(rotvec, torch.tensor([0.5, 0.5], dtype=torch.float64), check=False)
    assert torch.isnan(score[0]).any() and torch.isfinite(score[1]).all()
