"""SO(3) algebra: hat/vee, the exponential and logarithm maps, and random rotations.

Rotations are 3x3 matrices acting on column vectors, batched over any leading shape.
Rotation vectors (axis-angle, ``omega = angle * axis``) live in so(3) ~ R^3.

Numerics: ``exp_map`` uses Taylor series of sin(x)/x and (1-cos x)/x^2 below a small angle;
``log_map`` reads the angle with atan2 (accurate over the whole range, unlike arccos) and,
near pi where the antisymmetric part of R vanishes, recovers the axis from the symmetric
part (R + R^T)/2 = cos(a) I + (1 - cos a) n n^T, taking the sign from the antisymmetric part.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "hat",
    "vee",
    "exp_map",
    "log_map",
    "rotation_angle",
    "random_rotations",
    "rotation_from_two_vectors",
    "project_to_so3",
]


def hat(omega: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrix of a vector: hat(w) @ v == cross(w, v).

    omega : (..., 3) -> returns (..., 3, 3)
    """
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )


def vee(mat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` on the antisymmetric part of ``mat``: (..., 3, 3) -> (..., 3)."""
    return 0.5 * torch.stack(
        [
            mat[..., 2, 1] - mat[..., 1, 2],
            mat[..., 0, 2] - mat[..., 2, 0],
            mat[..., 1, 0] - mat[..., 0, 1],
        ],
        -1,
    )


def _small_angle_eps(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6


def exp_map(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (Rodrigues), stable at zero angle.

    omega : (..., 3), radians along the axis -> returns (..., 3, 3)
    """
    theta2 = (omega * omega).sum(-1)
    eps = _small_angle_eps(omega.dtype)
    small = theta2 < eps * eps
    # sqrt only of the safe branch: d sqrt/dx is inf at 0 and would turn the masked branch's
    # zero gradient into NaN (a zero-initialised rotation head produces exactly omega = 0)
    safe = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(safe)) / (safe * safe))
    K = hat(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def rotation_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation angle in [0, pi] of rotation matrices (..., 3, 3) -> (...), via atan2."""
    cos = 0.5 * (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1)
    sin = torch.linalg.norm(vee(R), dim=-1)
    return torch.atan2(sin, cos)


def log_map(R: torch.Tensor) -> torch.Tensor:
    """Rotation vector of rotation matrices, stable near 0 and near pi.

    R : (..., 3, 3) -> returns (..., 3) with norm in [0, pi].
    """
    theta = rotation_angle(R)
    v = vee(R)  # = sin(theta) * axis
    sin = torch.sin(theta)
    eps = _small_angle_eps(R.dtype)
    small = theta < eps
    # generic branch: theta / sin(theta) * v
    safe_sin = torch.where(small, torch.ones_like(sin), sin)
    factor = torch.where(small, 1 + theta * theta / 6, theta / safe_sin)
    generic = factor[..., None] * v

    # near-pi branch: axis from the symmetric part
    # theta/sin(theta) amplifies rounding near pi; past pi/2 the symmetric part is well conditioned
    near_pi = theta > 0.5 * math.pi
    cos = torch.cos(theta)
    sym = 0.5 * (R + R.transpose(-1, -2))
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    denom = (1 - cos).clamp_min(1e-12)[..., None, None]
    nnT = (sym - cos[..., None, None] * eye) / denom
    diag = torch.diagonal(nnT, dim1=-2, dim2=-1)
    k = diag.argmax(-1)
    col = torch.gather(nnT, -1, k[..., None, None].expand(*k.shape, 3, 1)).squeeze(-1)
    n = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sign = torch.sign((n * v).sum(-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    pi_branch = (sign * theta)[..., None] * n
    return torch.where(near_pi[..., None], pi_branch, generic)


def random_rotations(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-uniform random rotations, shape (*shape, 3, 3), from normalised Gaussian quaternions."""
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    q = q / q.norm(dim=-1, keepdim=True)
    return quaternion_to_matrix(q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4) in (w, x, y, z) order -> rotation matrices (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def rotation_from_two_vectors(e0: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt rotation whose first column points along e0 and whose second column lies in
    the (e0, e1) plane: (..., 3), (..., 3) -> (..., 3, 3). Used for frames and 6-D rotation heads.
    """
    x = e0 / e0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    y = e1 - (x * e1).sum(-1, keepdim=True) * x
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = torch.cross(x, y, dim=-1)
    return torch.stack([x, y, z], -1)


def project_to_so3(M: torch.Tensor) -> torch.Tensor:
    """Nearest rotation to each 3x3 matrix in the Frobenius norm: (..., 3, 3) -> (..., 3, 3).

    M = U S Vᵀ  ->  R = U diag(1, 1, det(U Vᵀ)) Vᵀ. Applied to a weighted sum of rotations it gives
    their chordal L2 mean, which commutes with left and right multiplication by rotations.
    Undefined for rank-deficient M (e.g. two rotations 180° apart averaged with equal weight).
    """
    U, _, Vh = torch.linalg.svd(M)
    d = torch.det(U @ Vh)
    U = torch.cat([U[..., :2], U[..., 2:] * d[..., None, None]], dim=-1)
    return U @ Vh
