"""The "posterior" x0 anchor: the exact Gaussian posterior mean, equivariant, and wired into the network."""
import math

import pytest
import torch

from openmm_starmd.diffusion import DiffusionConfig, SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.geometry.so3 import exp_map, rotation_angle
from openmm_starmd.model import ModelConfig, StarMDNetwork
from openmm_starmd.model.anchor import PosteriorAnchor
from openmm_starmd.model.sequence import ca_centroid

from .helpers import TINY, random_rigid_motion, residues_of, training_layout


@pytest.fixture
def posterior():
    return PosteriorAnchor(DiffusionConfig(), prior_nm=0.1, prior_rad=0.25)


def test_weights_hand_over_from_anchor_to_noisy_input(posterior):
    t = torch.tensor([1e-6, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0], dtype=torch.float64)
    alpha, c_t, c_r = posterior.weights(t)
    assert c_t[0] > 0.999 and c_t[-1] < 1e-3  # identity at t -> 0, the anchor at t = 1
    assert (c_t.diff() < 0).all() and (c_r.diff() < 0).all()
    # rotation noise never falls below sigma_min = 0.1 rad, so the rotation blend tops out below 1
    assert c_r[0] == pytest.approx(0.25 ** 2 / (0.25 ** 2 + 0.1 ** 2), rel=1e-4)


def test_translation_blend_is_the_regression_of_x0_on_x_t(posterior):
    """Monte Carlo: draw x0 ~ N(a, s^2), x_t from the real forward process; least squares slope = c."""
    diffuser = SE3Diffuser()
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 0.02
    a, o = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64)
    x0 = a + 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    x_t = diffuser.r3.forward_marginal(x0 - o, t, generator=g)[0] + o
    got = posterior.base(Rigid(torch.eye(3, dtype=torch.float64).expand(n, 1, 3, 3), a.expand(n, 1, 3)),
                         Rigid(torch.eye(3, dtype=torch.float64).expand(n, 1, 3, 3), x_t[:, None]),
                         o.expand(n, 3), torch.full((n,), t, dtype=torch.float64)).trans[:, 0]
    # the posterior mean has the smallest mean squared error of all estimators, x_t and a included
    mse = lambda est: float(((est - x0) ** 2).sum(-1).mean())
    assert mse(got) < 0.99 * min(mse(x_t), mse(a.expand(n, 3)))
    # and its weight equals the least-squares slope of x0 on x_t
    xc, yc = x_t - x_t.mean(0), x0 - x0.mean(0)
    slope = float((xc * yc).sum() / (xc * xc).sum())
    assert slope == pytest.approx(float(posterior.weights(torch.tensor(t, dtype=torch.float64))[1]), abs=0.01)


def test_rotation_blend_walks_the_geodesic(posterior):
    g = torch.Generator().manual_seed(1)
    Ra = exp_map(torch.randn(5, 3, generator=g, dtype=torch.float64))
    Rt = Ra @ exp_map(0.6 * torch.randn(5, 3, generator=g, dtype=torch.float64))
    t = torch.tensor(0.2, dtype=torch.float64)
    c_r = float(posterior.weights(t)[2])
    z = torch.zeros(5, 3, dtype=torch.float64)
    R = posterior.base(Rigid(Ra, z), Rigid(Rt, z), torch.zeros(3, dtype=torch.float64), t).rots
    total = rotation_angle(Ra.transpose(-1, -2) @ Rt)
    assert torch.allclose(rotation_angle(Ra.transpose(-1, -2) @ R), c_r * total, atol=1e-10)
    assert torch.allclose(rotation_angle(R.transpose(-1, -2) @ Rt), (1 - c_r) * total, atol=1e-10)


def test_blend_commutes_with_global_rigid_motions(posterior, short_md):
    f = short_md["frames"]
    a, x = Rigid(f.rots[0], f.trans[0]), Rigid(f.rots[3] @ exp_map(torch.full((3,), 0.2, dtype=torch.float64)),
                                               f.trans[3] + 0.05)
    o = a.trans.mean(0)
    R, v = random_rigid_motion()
    move = lambda r: Rigid(R @ r.rots, r.trans @ R.T + v)
    t = torch.tensor(0.03, dtype=torch.float64)
    out, moved = posterior.base(a, x, o, t), posterior.base(move(a), move(x), o @ R.T + v, t)
    assert torch.allclose(moved.trans, move(out).trans, atol=1e-10)
    assert torch.allclose(moved.rots, move(out).rots, atol=1e-10)


def test_fresh_network_predicts_the_posterior_base(short_md):
    """Zero head: noisy frame f >= 1 gets the blend of the un-noised frame f - 1 and its own input."""
    net = StarMDNetwork(ModelConfig(**TINY, x0_anchor="posterior")).double()
    seq = training_layout(short_md["frames"], 3, context_noise_nm=0.05)
    with torch.no_grad():
        out = net(residues_of(short_md), seq)
    anchor = Rigid(seq.anchor_frames.rots[:, :2], seq.anchor_frames.trans[:, :2])
    noisy = Rigid(seq.frames.rots[:, 4:], seq.frames.trans[:, 4:])
    mask = torch.ones(1, 1, anchor.trans.shape[2], dtype=torch.bool)
    want = net._posterior.base(anchor, noisy, ca_centroid(anchor, mask), seq.noise_level[:, 4:])
    assert torch.allclose(out.trans[:, 4:], want.trans) and torch.allclose(out.rots[:, 4:], want.rots)
    assert not torch.allclose(out.trans[:, 4:], anchor.trans) and not torch.allclose(out.trans[:, 4:], noisy.trans)
    assert torch.allclose(out.trans[:, 3], seq.frames.trans[:, 3])  # frame 0: its own noisy input


def test_fresh_network_tends_to_the_input_at_small_t_and_the_anchor_at_large_t(short_md):
    net = StarMDNetwork(ModelConfig(**TINY, x0_anchor="posterior")).double()
    seq = training_layout(short_md["frames"], 2, context_noise_nm=0.05)
    for t, target in ((1e-7, seq.frames.trans[:, 3]), (1.0, seq.anchor_frames.trans[:, 0])):
        seq.noise_level[:, 3] = t
        with torch.no_grad():
            out = net(residues_of(short_md), seq)
        assert (out.trans[:, 3] - target).abs().max() < 1e-3


def test_posterior_needs_positive_prior_scales():
    with pytest.raises(ValueError, match="anchor_prior"):
        ModelConfig(**TINY, x0_anchor="posterior", anchor_prior_nm=0.0)
    assert math.isfinite(ModelConfig(**TINY).anchor_prior_rad)


def test_output_scales_vanish_with_the_noise(posterior):
    t = torch.tensor([1e-8, 0.001, 0.01, 0.1, 1.0], dtype=torch.float64)
    k_t, k_r = posterior.output_scales(t)
    assert k_t[0] < 1e-3 and k_t[-1] > 0.99 and (k_t.diff() > 0).all() and (k_r.diff() > 0).all()
    # rotation noise never falls below sigma_min = 0.1 rad, so neither does its posterior spread
    assert k_r[0] == pytest.approx(0.1 / math.hypot(0.25, 0.1), rel=1e-4)


def test_trained_like_network_keeps_the_nearly_clean_input_at_tiny_t(short_md):
    """A network with random (non-zero) head still returns x_t's Cα at t -> 0: its update is scaled away."""
    from .helpers import random_network

    net = random_network(ModelConfig(**TINY, x0_anchor="posterior"))
    seq = training_layout(short_md["frames"], 2, context_noise_nm=0.05)
    res = residues_of(short_md)
    seq.noise_level[:, 3] = 1e-8
    with torch.no_grad():
        tiny = net(res, seq)
        seq.noise_level[:, 3] = 0.5
        mid = net(res, seq)
    assert (tiny.trans[:, 3] - seq.frames.trans[:, 3]).abs().max() < 1e-3
    assert (mid.trans[:, 3] - seq.frames.trans[:, 3]).abs().max() > 1e-2


def test_prior_that_follows_dt_is_the_fixed_prior_with_scaled_widths():
    """anchor_prior_dt_exponent γ: widths × (Δt / ref)^γ, i.e. exactly a fixed prior of those widths."""
    follow = PosteriorAnchor(DiffusionConfig(), 0.1, 0.25, dt_exponent=0.25, dt_ref_ns=0.1)
    assert PosteriorAnchor(DiffusionConfig(), 0.1, 0.25).prior_scale(torch.tensor([1.0])) is None
    dt = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)
    scale = follow.prior_scale(dt)
    torch.testing.assert_close(scale, torch.tensor([10 ** -0.25, 1.0, 10 ** 0.25], dtype=torch.float64))
    t = torch.tensor([[0.05], [0.3], [0.8]], dtype=torch.float64)
    for k in range(3):
        fixed = PosteriorAnchor(DiffusionConfig(), 0.1 * float(scale[k]), 0.25 * float(scale[k]))
        for a, b in zip(follow.weights(t[k], scale[k]), fixed.weights(t[k])):
            torch.testing.assert_close(a, b)
        for a, b in zip(follow.output_scales(t[k], scale[k]), fixed.output_scales(t[k])):
            torch.testing.assert_close(a, b)
    # a wider prior trusts the noisy input more at the same t
    c = [follow.weights(torch.tensor([0.3], dtype=torch.float64), s)[1] for s in scale]
    assert c[0] < c[1] < c[2]


def test_network_prior_widens_with_dt_unless_dt_is_fixed(short_md):
    """A fresh posterior network returns the posterior base: with γ > 0 its x0 at Δt 1 ns moves further
    from the prior centre (the previous frame) towards the noisy input than at 0.01 ns (by the ratio
    of the blend weights, ~3x at t = 0.3); with fixed_dt_ns the data's Δt no longer matters."""
    res = residues_of(short_md)
    outs = {}
    for fixed in (None, 0.1):
        net = StarMDNetwork(ModelConfig(**TINY, x0_anchor="posterior", anchor_prior_dt_exponent=0.25,
                                        fixed_dt_ns=fixed)).double()
        for dt in (0.01, 1.0):
            seq = training_layout(short_md["frames"], 3, dt_ns=dt)
            seq.noise_level[:, 3:] = 0.3
            with torch.no_grad():
                out = net(res, seq)
            # how far x0 of noisy frames 1, 2 moved from their prior centres, clean frames 0, 1
            outs[fixed, dt] = float((out.trans[:, 4:] - seq.frames.trans[:, :2]).norm(dim=-1).mean())
    assert outs[None, 1.0] > 2 * outs[None, 0.01]
    assert outs[0.1, 1.0] == pytest.approx(outs[0.1, 0.01], rel=1e-12)
    with pytest.raises(ValueError, match="anchor_prior_dt_exponent"):
        ModelConfig(**TINY, anchor_prior_dt_exponent=-0.5)
