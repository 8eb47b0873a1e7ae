"""Algebra of rigid transforms in openmm_starmd/geometry/rigid.py, on random transforms and on the
backbone frames of a real structure (crambin, 1EJG)."""
from pathlib import Path

import mdtraj as md
import pytest
import torch

from openmm_starmd.geometry.rigid import Rigid, apply, compose, identity, invert, invert_apply
from openmm_starmd.geometry.so3 import random_rotations, rotation_from_two_vectors

F64 = torch.float64
DATA = Path(__file__).resolve().parents[1] / "data"


def _random_rigid(shape, generator):
    rots = random_rotations(shape, generator=generator, dtype=F64)
    trans = torch.randn(*shape, 3, generator=generator, dtype=F64)
    return Rigid(rots, trans)


def _assert_rigid_close(a, b, atol=1e-12):
    torch.testing.assert_close(a.rots, b.rots, rtol=0, atol=atol)
    torch.testing.assert_close(a.trans, b.trans, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def crambin_backbone():
    """N, CA, C positions (n_res, 3, 3) in nm from the crambin crystal structure."""
    traj = md.load(str(DATA / "crambin_1ejg.pdb"))
    top = traj.topology
    protein = [r for r in top.residues if r.is_protein]
    # Alternate locations load as one conformer; keep residues with all three backbone atoms.
    rows = []
    for res in protein:
        names = {a.name: a.index for a in res.atoms}
        if {"N", "CA", "C"} <= names.keys():
            rows.append([names["N"], names["CA"], names["C"]])
    xyz = torch.as_tensor(traj.xyz[0], dtype=F64)
    return xyz[torch.as_tensor(rows)]


def test_identity_is_neutral():
    g = torch.Generator().manual_seed(0)
    a = _random_rigid((5, 7), g)
    e = identity((5, 7), dtype=F64)
    _assert_rigid_close(compose(a, e), a, atol=0)
    _assert_rigid_close(compose(e, a), a, atol=0)


def test_compose_with_inverse_is_identity():
    g = torch.Generator().manual_seed(1)
    a = _random_rigid((64,), g)
    e = identity((64,), dtype=F64)
    _assert_rigid_close(compose(a, invert(a)), e)
    _assert_rigid_close(compose(invert(a), a), e)
    _assert_rigid_close(invert(invert(a)), a)


def test_compose_is_associative_and_inverse_reverses_order():
    g = torch.Generator().manual_seed(2)
    a, b, c = (_random_rigid((32,), g) for _ in range(3))
    _assert_rigid_close(compose(compose(a, b), c), compose(a, compose(b, c)))
    _assert_rigid_close(invert(compose(a, b)), compose(invert(b), invert(a)))


def test_apply_of_composition_is_composition_of_applies():
    g = torch.Generator().manual_seed(3)
    a, b = _random_rigid((8,), g), _random_rigid((8,), g)
    x = torch.randn(8, 11, 3, generator=g, dtype=F64)
    torch.testing.assert_close(apply(compose(a, b), x), apply(a, apply(b, x)), rtol=0, atol=1e-12)
    torch.testing.assert_close(invert_apply(a, apply(a, x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(invert_apply(a, x), apply(invert(a), x), rtol=0, atol=1e-12)


def test_apply_preserves_distances():
    g = torch.Generator().manual_seed(4)
    a = _random_rigid((3,), g)
    x = torch.randn(3, 20, 3, generator=g, dtype=F64)
    torch.testing.assert_close(torch.cdist(apply(a, x), apply(a, x)), torch.cdist(x, x), rtol=0, atol=1e-12)


def test_single_point_broadcast_form():
    g = torch.Generator().manual_seed(5)
    a = _random_rigid((6,), g)
    p = torch.randn(6, 3, generator=g, dtype=F64)
    expected = (a.rots @ p[..., None]).squeeze(-1) + a.trans
    torch.testing.assert_close(apply(a, p[..., None, :])[..., 0, :], expected, rtol=0, atol=1e-14)


def test_backbone_frames_round_trip_on_crambin(crambin_backbone):
    """Residue frames from (N, CA, C): local coordinates are canonical and apply() restores atoms."""
    bb = crambin_backbone
    n, ca, c = bb.unbind(-2)
    frames = Rigid(rotation_from_two_vectors(c - ca, n - ca), ca)
    local = invert_apply(frames, bb)
    assert local.shape == bb.shape
    # CA at the origin, C on +x, N in the xy-plane with y > 0.
    torch.testing.assert_close(local[:, 1], torch.zeros_like(local[:, 1]), rtol=0, atol=1e-12)
    assert local[:, 2, 1:].abs().max() < 1e-12 and (local[:, 2, 0] > 0).all()
    assert local[:, 0, 2].abs().max() < 1e-12 and (local[:, 0, 1] > 0).all()
    # Bond lengths in the local frame match the structure (C-CA ~ 0.152 nm).
    torch.testing.assert_close(local[:, 2, 0], (c - ca).norm(dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(apply(frames, local), bb, rtol=0, atol=1e-12)


def test_relative_frames_are_invariant_to_a_global_motion(crambin_backbone):
    """T_i^-1 o T_j does not change when the whole structure is moved rigidly."""
    bb = crambin_backbone
    g = torch.Generator().manual_seed(6)
    motion = _random_rigid((), g)
    bb_moved = apply(motion, bb.reshape(1, -1, 3)).reshape(bb.shape)

    def frames(x):
        n, ca, c = x.unbind(-2)
        return Rigid(rotation_from_two_vectors(c - ca, n - ca), ca)

    f, f_moved = frames(bb), frames(bb_moved)
    _assert_rigid_close(f_moved, compose(Rigid(motion.rots.expand_as(f.rots), motion.trans.expand_as(f.trans)), f))
    rel = compose(invert(Rigid(f.rots[:, None], f.trans[:, None])), Rigid(f.rots[None], f.trans[None]))
    rel_moved = compose(
        invert(Rigid(f_moved.rots[:, None], f_moved.trans[:, None])), Rigid(f_moved.rots[None], f_moved.trans[None])
    )
    _assert_rigid_close(rel_moved, rel, atol=1e-11)
