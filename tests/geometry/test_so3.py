"""Properties of the SO(3) maps in openmm_starmd/geometry/so3.py: exact inverses, stability at
angles 0 and pi, orthonormality, and Haar-uniformity of random rotations."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from openmm_starmd.geometry.so3 import (
    exp_map,
    hat,
    log_map,
    project_to_so3,
    quaternion_to_matrix,
    random_rotations,
    rotation_angle,
    rotation_from_two_vectors,
    vee,
)

F64 = torch.float64


def _unit_vectors(n, generator):
    v = torch.randn(n, 3, generator=generator, dtype=F64)
    return v / v.norm(dim=-1, keepdim=True)


def _same_rotation_vector(a, b, atol):
    """Rotation vectors agree; at angle pi, w and -w name the same rotation."""
    direct = (a - b).abs().amax(-1)
    antipodal = (a + b).abs().amax(-1)
    near_pi = a.norm(dim=-1) > math.pi - 1e-5
    err = torch.where(near_pi, torch.minimum(direct, antipodal), direct)
    assert err.max().item() < atol, f"max rotation-vector error {err.max().item():.3g}"


def test_hat_vee_are_inverse_and_hat_is_cross_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, generator=g, dtype=F64)
    v = torch.randn(64, 3, generator=g, dtype=F64)
    torch.testing.assert_close(vee(hat(w)), w, rtol=0, atol=0)
    torch.testing.assert_close(hat(w) @ v[..., None], torch.cross(w, v, dim=-1)[..., None])
    torch.testing.assert_close(hat(w), -hat(w).transpose(-1, -2), rtol=0, atol=0)


def test_vee_reads_only_the_antisymmetric_part():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, generator=g, dtype=F64)
    s = torch.randn(16, 3, 3, generator=g, dtype=F64)
    sym = s + s.transpose(-1, -2)
    torch.testing.assert_close(vee(hat(w) + sym), w)


def test_exp_map_gives_proper_rotations():
    g = torch.Generator().manual_seed(2)
    w = 4.0 * torch.randn(256, 3, generator=g, dtype=F64)
    R = exp_map(w)
    eye = torch.eye(3, dtype=F64).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(256, dtype=F64), rtol=0, atol=1e-13)


def test_exp_map_matches_matrix_exponential():
    g = torch.Generator().manual_seed(3)
    w = 2.0 * torch.randn(64, 3, generator=g, dtype=F64)
    torch.testing.assert_close(exp_map(w), torch.linalg.matrix_exp(hat(w)), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "angles",
    [
        pytest.param("uniform", id="uniform-angles"),
        pytest.param("near-zero", id="within-1e-6-of-0"),
        pytest.param("near-pi", id="within-1e-6-of-pi"),
        pytest.param("exact", id="exactly-0-and-pi"),
    ],
)
def test_log_exp_round_trip(angles):
    g = torch.Generator().manual_seed(4)
    n = 512
    axis = _unit_vectors(n, g)
    u = torch.rand(n, generator=g, dtype=F64)
    theta = {
        "uniform": math.pi * u,
        "near-zero": 1e-6 * u,
        "near-pi": math.pi - 1e-6 * u,
        "exact": torch.tensor([0.0, math.pi], dtype=F64).repeat(n // 2),
    }[angles]
    w = theta[:, None] * axis
    R = exp_map(w)
    w_back = log_map(R)
    _same_rotation_vector(w_back, w, atol=1e-10)
    torch.testing.assert_close(exp_map(w_back), R, rtol=0, atol=1e-10)
    torch.testing.assert_close(rotation_angle(R), theta, rtol=0, atol=1e-10)


def test_exp_log_round_trip_on_random_rotations():
    g = torch.Generator().manual_seed(5)
    R = random_rotations((2048,), generator=g, dtype=F64)
    torch.testing.assert_close(exp_map(log_map(R)), R, rtol=0, atol=1e-10)
    assert (log_map(R).norm(dim=-1) <= math.pi + 1e-12).all()


def test_log_of_identity_is_exactly_zero():
    R = torch.eye(3, dtype=F64).expand(4, 3, 3)
    assert torch.equal(log_map(R), torch.zeros(4, 3, dtype=F64))
    assert torch.equal(exp_map(torch.zeros(4, 3, dtype=F64)), R)


def test_log_exp_round_trip_float32():
    g = torch.Generator().manual_seed(6)
    w = _unit_vectors(1024, g) * (math.pi * 0.999 * torch.rand(1024, 1, generator=g, dtype=F64))
    w32 = w.float()
    torch.testing.assert_close(log_map(exp_map(w32)), w32, rtol=0, atol=5e-4)


def test_random_rotations_are_orthonormal_with_unit_determinant():
    g = torch.Generator().manual_seed(7)
    R = random_rotations((4, 256), generator=g, dtype=F64)
    assert R.shape == (4, 256, 3, 3)
    eye = torch.eye(3, dtype=F64).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(4, 256, dtype=F64), rtol=0, atol=1e-13)


def test_random_rotations_are_haar_distributed():
    """Angle density (1 - cos w)/pi, i.e. CDF (w - sin w)/pi; axis uniform on the sphere."""
    g = torch.Generator().manual_seed(8)
    R = random_rotations((20000,), generator=g, dtype=F64)
    theta = rotation_angle(R).numpy()
    assert stats.kstest(theta, lambda w: (w - np.sin(w)) / np.pi).pvalue > 1e-3
    # Haar measure is left- and right-invariant: R @ Q must have the same angle law for fixed Q.
    Q = random_rotations((), generator=g, dtype=F64)
    theta_q = rotation_angle(R @ Q).numpy()
    assert stats.kstest(theta_q, lambda w: (w - np.sin(w)) / np.pi).pvalue > 1e-3
    # Each column is uniform on S^2, so each coordinate is uniform on [-1, 1].
    for i in range(3):
        assert stats.kstest(R[:, i, 0].numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3


def test_random_rotations_respect_generator():
    a = random_rotations((8,), generator=torch.Generator().manual_seed(9))
    b = random_rotations((8,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert a.dtype == torch.float32


def test_quaternion_to_matrix_agrees_with_exp_map():
    """q = (cos(w/2), sin(w/2) n) is the rotation by w about n."""
    g = torch.Generator().manual_seed(10)
    axis = _unit_vectors(64, g)
    theta = math.pi * torch.rand(64, generator=g, dtype=F64)
    q = torch.cat([torch.cos(theta / 2)[:, None], torch.sin(theta / 2)[:, None] * axis], -1)
    torch.testing.assert_close(quaternion_to_matrix(q), exp_map(theta[:, None] * axis), rtol=0, atol=1e-13)
    torch.testing.assert_close(quaternion_to_matrix(-q), quaternion_to_matrix(q), rtol=0, atol=0)


def test_rotation_from_two_vectors_frame():
    g = torch.Generator().manual_seed(11)
    e0 = torch.randn(128, 3, generator=g, dtype=F64)
    e1 = torch.randn(128, 3, generator=g, dtype=F64)
    R = rotation_from_two_vectors(e0, e1)
    eye = torch.eye(3, dtype=F64).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(128, dtype=F64))
    torch.testing.assert_close(R[..., 0], e0 / e0.norm(dim=-1, keepdim=True))
    # e1 lies in the span of the first two columns, on the positive side of the second.
    assert (e1 * R[..., 2]).sum(-1).abs().max() < 1e-12
    assert ((e1 * R[..., 1]).sum(-1) > 0).all()
    # Equivariance: rotating both inputs rotates the frame.
    Q = random_rotations((), generator=g, dtype=F64)
    torch.testing.assert_close(rotation_from_two_vectors(e0 @ Q.T, e1 @ Q.T), Q @ R)


def test_exp_map_gradient_is_finite_at_zero():
    """A zero-initialised rotation-update head produces exactly w = 0; its gradient must exist.

    d/dw <M, exp(hat(w))> at w = 0 is d/dw <M, hat(w)> = 2 vee(M).
    """
    g = torch.Generator().manual_seed(12)
    M = torch.randn(4, 3, 3, generator=g, dtype=F64)
    w = torch.zeros(4, 3, dtype=F64, requires_grad=True)
    (exp_map(w) * M).sum().backward()
    torch.testing.assert_close(w.grad, 2 * vee(M))


def test_projection_recovers_a_rotation_from_a_perturbed_matrix():
    g = torch.Generator().manual_seed(0)
    R = random_rotations((50,), generator=g, dtype=torch.float64)
    assert torch.allclose(project_to_so3(R), R, atol=1e-12)
    P = project_to_so3(R + 0.05 * torch.randn(50, 3, 3, generator=g, dtype=torch.float64))
    assert torch.allclose(torch.det(P), torch.ones(50, dtype=torch.float64))
    assert (log_map(R.transpose(-1, -2) @ P).norm(dim=-1) < 0.2).all()
    # a reflection-free result even where the plain SVD factor U V^T would be a reflection
    flipped = -R  # det -1
    assert torch.allclose(torch.det(project_to_so3(flipped)), torch.ones(50, dtype=torch.float64))
