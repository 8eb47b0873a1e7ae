"""IGSO(3) diffusion of rotations (openmm_starmd/diffusion/so3_diffuser.py): the sigma schedule and
its diffusion coefficient, marginals at t = 1 and t = 0, scores from x_0, and the reverse step."""
import math

import numpy as np
import torch
from scipy import stats

from openmm_starmd.diffusion import DiffusionConfig, SO3Diffuser
from openmm_starmd.geometry import igso3
from openmm_starmd.geometry.so3 import exp_map, random_rotations, rotation_angle

from .helpers import haar_angle_cdf, igso3_angle_cdf

F64 = torch.float64


def _relative_angles(R0, R):
    return rotation_angle(R0.transpose(-1, -2) @ R).numpy()


def test_sigma_schedule_and_diffusion_coefficient():
    so3 = SO3Diffuser()
    t = torch.linspace(0, 1, 21, dtype=F64)
    torch.testing.assert_close(so3.sigma(t), torch.log(t * math.exp(1.5) + (1 - t) * math.exp(0.1)))
    assert so3.sigma(0.0).item() == 0.1 and abs(so3.sigma(1.0).item() - 1.5) < 1e-15
    h = 1e-6
    tc = t[1:-1]
    fd = (so3.sigma(tc + h) ** 2 - so3.sigma(tc - h) ** 2) / (2 * h)
    torch.testing.assert_close(so3.g2(tc), fd, rtol=1e-8, atol=0)


def test_marginal_at_t1_is_igso3_of_sigma_max_about_x0():
    """The t = 1 marginal from a fixed R0 is IGSO(3)(1.5) about R0 -- which is *not* Haar (KS gap 0.13)."""
    so3 = SO3Diffuser()
    g = torch.Generator().manual_seed(0)
    R0 = random_rotations((), generator=g, dtype=F64).expand(20000, 3, 3)
    R1, _ = so3.forward_marginal(R0, 1.0, generator=g)
    angles = _relative_angles(R0, R1)
    exact = lambda x: igso3.series_angle_cdf(torch.as_tensor(x), 1.5).numpy()  # noqa: E731
    assert stats.kstest(angles, exact).pvalue > 1e-3
    assert stats.kstest(angles, haar_angle_cdf).statistic > 0.1


def test_marginal_at_t1_is_haar_when_sigma_max_is_large():
    so3 = SO3Diffuser(DiffusionConfig(rot_sigma_max=3.0))
    g = torch.Generator().manual_seed(1)
    R0 = random_rotations((), generator=g, dtype=F64).expand(20000, 3, 3)
    R1, _ = so3.forward_marginal(R0, 1.0, generator=g)
    assert stats.kstest(_relative_angles(R0, R1), haar_angle_cdf).pvalue > 1e-3
    # Not only relative to R0: the rotations themselves are Haar.
    assert stats.kstest(rotation_angle(R1).numpy(), haar_angle_cdf).pvalue > 1e-3


def test_marginal_at_t0_is_the_sigma_min_noise_floor():
    so3 = SO3Diffuser()
    g = torch.Generator().manual_seed(2)
    R0 = random_rotations((10000,), generator=g, dtype=F64)
    R, _ = so3.forward_marginal(R0, 0.0, generator=g)
    assert stats.kstest(_relative_angles(R0, R), igso3_angle_cdf(0.1)).pvalue > 1e-3
    # With a smaller sigma_min, x_t -> x_0 as t -> 0 (99% of angles below 4 sigma_min).
    tiny = SO3Diffuser(DiffusionConfig(rot_sigma_min=0.02))
    R, _ = tiny.forward_marginal(R0, 0.0, generator=g)
    assert np.quantile(_relative_angles(R0, R), 0.99) < 0.08


def test_score_from_x0_equals_the_forward_score():
    so3 = SO3Diffuser()
    g = torch.Generator().manual_seed(3)
    R0 = random_rotations((500,), generator=g, dtype=F64)
    t = torch.rand(500, generator=g, dtype=F64)
    R_t, score = so3.forward_marginal(R0, t, generator=g)
    torch.testing.assert_close(so3.score(R_t, R0, t), score, rtol=1e-7, atol=1e-7)


def test_score_is_invariant_to_a_global_rotation():
    so3 = SO3Diffuser()
    g = torch.Generator().manual_seed(4)
    R0 = random_rotations((100,), generator=g, dtype=F64)
    R_t, _ = so3.forward_marginal(R0, 0.6, generator=g)
    Q = random_rotations((), generator=g, dtype=F64)
    torch.testing.assert_close(so3.score(Q @ R_t, Q @ R0, 0.6), so3.score(R_t, R0, 0.6))


def test_prior_is_haar():
    so3 = SO3Diffuser()
    R = so3.sample_prior((20000,), generator=torch.Generator().manual_seed(5), dtype=F64)
    assert stats.kstest(rotation_angle(R).numpy(), haar_angle_cdf).pvalue > 1e-3


def test_score_scaling_is_the_rms_score_component():
    so3 = SO3Diffuser()
    R0 = torch.eye(3, dtype=F64).expand(20000, 3, 3)
    for t in (0.0, 0.3, 1.0):
        _, s = so3.forward_marginal(R0, t, generator=torch.Generator().manual_seed(6))
        assert abs((s**2).mean().sqrt().item() / so3.score_scaling(t).item() - 1) < 0.03


def test_reverse_step_formulas():
    so3 = SO3Diffuser()
    g = torch.Generator().manual_seed(7)
    R = random_rotations((10,), generator=g, dtype=F64)
    s = torch.randn(10, 3, generator=g, dtype=F64)
    t, dt = 0.4, 0.01
    g2 = so3.g2(t)
    torch.testing.assert_close(so3.reverse_step(R, s, t, dt, ode=True), R @ exp_map(0.5 * g2 * s * dt))
    torch.testing.assert_close(so3.reverse_step(R, s, t, dt, noise_scale=0.0), R @ exp_map(g2 * s * dt))
    torch.testing.assert_close(so3.reverse_step(R, torch.zeros_like(s), t, dt, ode=True), R)
