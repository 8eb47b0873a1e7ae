"""Batched rigid transforms T = (R, t): x -> R x + t.

A transform is a pair of tensors ``rots`` (..., 3, 3) and ``trans`` (..., 3), in nm where
they describe residue frames. Plain functions over pairs keep the algebra easy to test and
free of a class hierarchy; :class:`Rigid` is a thin named tuple for readability.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Rigid", "compose", "invert", "apply", "invert_apply", "identity"]


class Rigid(NamedTuple):
    """rots : (..., 3, 3) rotation matrices; trans : (..., 3) translations (nm)."""

    rots: torch.Tensor
    trans: torch.Tensor


def identity(shape, dtype=torch.float32, device=None) -> Rigid:
    """Identity transforms of batch shape ``shape``."""
    eye = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
    return Rigid(eye, torch.zeros(*shape, 3, dtype=dtype, device=device))


def compose(a: Rigid, b: Rigid) -> Rigid:
    """a ∘ b : x -> a(b(x)) = Ra (Rb x + tb) + ta."""
    rots = a.rots @ b.rots
    trans = (a.rots @ b.trans[..., None]).squeeze(-1) + a.trans
    return Rigid(rots, trans)


def invert(a: Rigid) -> Rigid:
    """Inverse transform: x -> R^T (x - t)."""
    rt = a.rots.transpose(-1, -2)
    return Rigid(rt, -(rt @ a.trans[..., None]).squeeze(-1))


def apply(a: Rigid, x: torch.Tensor) -> torch.Tensor:
    """Apply to points x of shape (..., P, 3) with transforms of shape (...): returns (..., P, 3).

    Points broadcast against the transform batch: ``x`` (..., 3) with one point per transform
    also works when called as ``apply(a, x[..., None, :])[..., 0, :]``.
    """
    return torch.einsum("...ij,...pj->...pi", a.rots, x) + a.trans[..., None, :]


def invert_apply(a: Rigid, x: torch.Tensor) -> torch.Tensor:
    """Apply the inverse transform to points (..., P, 3): R^T (x - t)."""
    return torch.einsum("...ji,...pj->...pi", a.rots, x - a.trans[..., None, :])
