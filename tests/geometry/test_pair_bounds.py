"""Pair distance bounds: exact projection onto [d_min, d_max], rigid residue moves, equivariance."""
import pytest
import torch

from openmm_starmd.geometry import so3
from openmm_starmd.geometry.pair_bounds import check_pairs, clamp_pair_distances
from openmm_starmd.geometry.rigid import Rigid


def _frames(n=6, batch=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    rots = so3.exp_map(torch.randn(*batch, n, 3, generator=g, dtype=torch.float64))
    trans = torch.randn(*batch, n, 3, generator=g, dtype=torch.float64)
    return Rigid(rots, trans)


def _dist(x, pairs):
    return torch.linalg.vector_norm(x[..., pairs[:, 1], :] - x[..., pairs[:, 0], :], dim=-1)


def test_pairs_end_inside_the_bounds_and_nothing_else_moves():
    f = _frames()
    pairs, lo, hi = check_pairs([[0, 3], [1, 5]], 6, 0.4, 0.68)
    before = _dist(f.trans, pairs)
    out = clamp_pair_distances(f, pairs, lo, hi)
    after = _dist(out.trans, pairs)
    torch.testing.assert_close(after, before.clamp(0.4, 0.68), rtol=0, atol=1e-12)
    assert (before > 0.68).any()  # the random frames start outside, so something was moved
    assert torch.equal(out.rots, f.rots)
    untouched = [2, 4]
    assert torch.equal(out.trans[..., untouched, :], f.trans[..., untouched, :])
    # each pair's midpoint stays put: both residues move by half the excess
    mid = lambda x: 0.5 * (x[..., pairs[:, 0], :] + x[..., pairs[:, 1], :])  # noqa: E731
    torch.testing.assert_close(mid(out.trans), mid(f.trans), rtol=0, atol=1e-12)
    # a pair already inside is left exactly as it was
    inside = check_pairs([[0, 3]], 6, 0.01, 100.0)
    assert torch.equal(clamp_pair_distances(f, *inside).trans, f.trans)


def test_projection_commutes_with_rotations_and_translations():
    f = _frames(seed=1)
    bounds = check_pairs([[0, 3], [1, 5]], 6, [0.4, 0.5], [0.6, 0.7])
    g = torch.Generator().manual_seed(7)
    r = so3.exp_map(torch.randn(3, generator=g, dtype=torch.float64))
    t = torch.randn(3, generator=g, dtype=torch.float64)
    moved = Rigid(r @ f.rots, f.trans @ r.T + t)
    a = clamp_pair_distances(moved, *bounds)
    b = clamp_pair_distances(f, *bounds)
    torch.testing.assert_close(a.trans, b.trans @ r.T + t, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.rots, r @ b.rots, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pairs, lo, hi, message", [
    ([[0, 6]], 0.4, 0.6, "0..5"),
    ([[0, 1], [1, 2]], 0.4, 0.6, "disjoint"),
    ([[2, 2]], 0.4, 0.6, "two different residues"),
    ([[0, 1]], 0.6, 0.4, "d_min <= d_max"),
])
def test_bad_pairs_are_named(pairs, lo, hi, message):
    with pytest.raises(ValueError, match=message):
        check_pairs(pairs, 6, lo, hi)
