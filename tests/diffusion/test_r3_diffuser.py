"""VP-SDE on translations (openmm_starmd/diffusion/r3_diffuser.py): marginals at t = 1 and t = 0, the
score against autograd, units under coordinate scaling, and the reverse-step formulas."""
import math

import pytest
import torch
from scipy import stats

from openmm_starmd.diffusion import DiffusionConfig, R3Diffuser

F64 = torch.float64


def test_schedule_closed_forms():
    r3 = R3Diffuser()
    t = torch.linspace(0, 1, 11, dtype=F64)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(r3.integrated_beta(t), B)
    torch.testing.assert_close(r3.mean_coef(t), torch.exp(-B / 2))
    torch.testing.assert_close(r3.variance(t), 1 - torch.exp(-B))
    # B' = beta, by finite differences.
    h = 1e-6
    tc = t[1:-1]
    torch.testing.assert_close((r3.integrated_beta(tc + h) - r3.integrated_beta(tc - h)) / (2 * h), r3.beta(tc))
    assert r3.variance(0.0) == 0 and r3.mean_coef(0.0) == 1


def test_marginal_at_t1_is_the_standard_normal_prior():
    r3 = R3Diffuser()
    x0 = torch.tensor([2.0, -1.0, 0.5], dtype=F64).expand(20000, 3)
    x1, _ = r3.forward_marginal(x0, 1.0, generator=torch.Generator().manual_seed(0))
    # Exact law N(a(1) x0, v(1)), and a(1) < 7e-3, v(1) > 0.9999: the prior N(0, I).
    assert r3.mean_coef(1.0) < 7e-3 and abs(r3.variance(1.0) - 1) < 1e-4
    for i in range(3):
        assert stats.kstest(x1[:, i].numpy(), "norm").pvalue > 1e-3
    assert x1.mean(0).abs().max() < 4 / math.sqrt(20000) + 0.014
    torch.testing.assert_close(x1.var(0), torch.ones(3, dtype=F64), rtol=0, atol=0.04)


def test_marginal_at_t0_is_exact_and_small_t_is_close():
    r3 = R3Diffuser()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(100, 3, generator=g, dtype=F64)
    x_t, _ = r3.forward_marginal(x0, 0.0, generator=g)
    assert torch.equal(x_t, x0)
    x_t, _ = r3.forward_marginal(x0, 1e-4, generator=g)
    assert (x_t - x0).abs().max() < 0.02


def test_score_matches_autograd_of_the_gaussian_log_density():
    cfg = DiffusionConfig(coordinate_scale_nm=0.5)
    r3 = R3Diffuser(cfg)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 3, generator=g, dtype=F64)
    t = torch.rand(64, generator=g, dtype=F64) * 0.98 + 0.02
    x_t, score = r3.forward_marginal(x0, t, generator=g)
    # Density in diffusion units u = x_nm / scale: N(u; a u0, v I).
    u = (x_t / 0.5).requires_grad_(True)
    a, v = r3.mean_coef(t)[:, None], r3.variance(t)[:, None]
    log_q = (-((u - a * x0 / 0.5) ** 2) / (2 * v)).sum()
    (grad,) = torch.autograd.grad(log_q, u)
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r3.score(x_t, x0, t), score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r3.x0_from_score(x_t, score, t), x0, rtol=1e-9, atol=1e-9)


def test_prior_scale_is_coordinate_scale():
    r3 = R3Diffuser(DiffusionConfig(coordinate_scale_nm=0.25))
    x = r3.sample_prior((20000,), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert abs(x.std().item() - 0.25) < 0.005


def test_score_scaling_is_the_rms_score_component():
    r3 = R3Diffuser()
    x0 = torch.zeros(40000, 3, dtype=F64)
    for t in (0.05, 0.5):
        _, s = r3.forward_marginal(x0, t, generator=torch.Generator().manual_seed(4))
        assert abs((s**2).mean().sqrt().item() / r3.score_scaling(t).item() - 1) < 0.01


def test_reverse_step_formulas():
    r3 = R3Diffuser(DiffusionConfig(coordinate_scale_nm=2.0))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, generator=g, dtype=F64)
    s = torch.randn(10, 3, generator=g, dtype=F64)
    t, dt = 0.7, 0.01
    beta = r3.beta(t)
    u = x / 2.0
    ode = r3.reverse_step(x, s, t, dt, ode=True)
    torch.testing.assert_close(ode, 2.0 * (u + 0.5 * beta * (u + s) * dt))
    no_noise = r3.reverse_step(x, s, t, dt, noise_scale=0.0, generator=g)
    torch.testing.assert_close(no_noise, 2.0 * (u + beta * (0.5 * u + s) * dt))
    a = r3.reverse_step(x, s, t, dt, generator=torch.Generator().manual_seed(6))
    b = r3.reverse_step(x, s, t, dt, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, no_noise)


def test_explicit_noise_is_used():
    r3 = R3Diffuser()
    x0 = torch.ones(4, 3, dtype=F64)
    z = torch.randn(4, 3, dtype=F64)
    x_t, s = r3.forward_marginal(x0, 0.5, noise=z)
    torch.testing.assert_close(x_t, r3.mean_coef(0.5) * x0 + r3.variance(0.5).sqrt() * z)
    torch.testing.assert_close(s, -z / r3.variance(0.5).sqrt())


@pytest.mark.parametrize("t", [-0.1, 1.5])
def test_time_outside_unit_interval_raises(t):
    with pytest.raises(ValueError, match="outside the diffusion time range"):
        R3Diffuser().forward_marginal(torch.zeros(2, 3), t)


def test_time_of_wrong_shape_raises():
    with pytest.raises(ValueError, match="does not broadcast"):
        R3Diffuser().forward_marginal(torch.zeros(2, 5, 3), torch.rand(3))
