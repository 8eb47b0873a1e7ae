"""SE(3) diffusion of residue frames (openmm_starmd/diffusion/se3_diffuser.py): the API the network
and sampler use, exactness of scores from x_0, the equivariance that holds (and the one that does not),
contextual noise, and the reverse SDE / probability-flow ODE run with an exact x_0 oracle."""
import math

import pytest
import torch
from scipy import stats

from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.geometry.so3 import random_rotations, rotation_angle

from .helpers import igso3_angle_cdf

F64 = torch.float64


@pytest.fixture(scope="module")
def diffuser():
    return SE3Diffuser()


def _random_frames(shape, generator, dtype=F64, spread_nm=0.5):
    rots = random_rotations(shape, generator=generator, dtype=dtype)
    trans = spread_nm * torch.randn(*shape, 3, generator=generator, dtype=dtype)
    return Rigid(rots, trans)


def _rotate(Q, rigid):
    return Rigid(Q @ rigid.rots, rigid.trans @ Q.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_per_frame_times(diffuser, dtype):
    g = torch.Generator().manual_seed(0)
    B, L, N = 2, 3, 7
    x0 = _random_frames((B, L, N), g, dtype=dtype)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.1, 0.2, 0.3]], dtype=dtype)[..., None]
    x_t, rot_score, trans_score = diffuser.forward_marginal(x0, t, generator=g)
    assert x_t.rots.shape == (B, L, N, 3, 3) and x_t.trans.shape == (B, L, N, 3)
    assert rot_score.shape == trans_score.shape == (B, L, N, 3)
    assert {x_t.rots.dtype, x_t.trans.dtype, rot_score.dtype, trans_score.dtype} == {dtype}
    # Frame (0, 0) is at t = 0: translations untouched; noise grows with t.
    assert torch.equal(x_t.trans[0, 0], x0.trans[0, 0])
    err = (x_t.trans - x0.trans).norm(dim=-1).mean(-1)
    assert err[0, 2] > err[1, 2] > err[1, 0]
    prior = diffuser.sample_prior((B, L, N), generator=g, dtype=dtype)
    assert prior.rots.shape == (B, L, N, 3, 3) and prior.trans.dtype == dtype
    step = diffuser.reverse_step(x_t, x0, t.clamp(min=0.01), 0.005, generator=g)
    assert step.rots.shape == (B, L, N, 3, 3) and step.rots.dtype == dtype


def test_scores_from_exact_x0_equal_forward_scores(diffuser):
    g = torch.Generator().manual_seed(1)
    x0 = _random_frames((4, 50), g)
    t = torch.rand(4, 1, generator=g, dtype=F64) * 0.99 + 0.01
    x_t, rot_score, trans_score = diffuser.forward_marginal(x0, t, generator=g)
    rs, ts = diffuser.scores_from_x0(x_t, x0, t)
    torch.testing.assert_close(rs, rot_score, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(ts, trans_score, rtol=1e-9, atol=1e-9)


def test_float32_scores_agree_with_float64(diffuser):
    g = torch.Generator().manual_seed(2)
    x0 = _random_frames((200,), g)
    x_t, _, _ = diffuser.forward_marginal(x0, 0.4, generator=g)
    rs64, ts64 = diffuser.scores_from_x0(x_t, x0, 0.4)
    to32 = lambda r: Rigid(r.rots.float(), r.trans.float())  # noqa: E731
    rs32, ts32 = diffuser.scores_from_x0(to32(x_t), to32(x0), 0.4)
    torch.testing.assert_close(rs32.double(), rs64, rtol=0, atol=2e-3 * rs64.abs().max().item())
    torch.testing.assert_close(ts32.double(), ts64, rtol=0, atol=1e-4 * ts64.abs().max().item())


def test_generator_reproduces_a_call(diffuser):
    x0 = _random_frames((30,), torch.Generator().manual_seed(3))
    a = diffuser.forward_marginal(x0, 0.5, generator=torch.Generator().manual_seed(4))
    b = diffuser.forward_marginal(x0, 0.5, generator=torch.Generator().manual_seed(4))
    c = diffuser.forward_marginal(x0, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0].rots, b[0].rots) and torch.equal(a[0].trans, b[0].trans) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0].trans, c[0].trans)


def test_noising_commutes_with_rotations_about_the_origin(diffuser):
    """Same seed: rotations R_t -> Q R_t exactly, rotation scores unchanged (body frame). Translations
    are equivariant when the noise rotates with them: x_t -> Q x_t and the score -> Q score."""
    g = torch.Generator().manual_seed(6)
    x0 = _random_frames((64,), g)
    Q = random_rotations((), generator=g, dtype=F64)
    t = 0.45
    x_t, rot_score, _ = diffuser.forward_marginal(x0, t, generator=torch.Generator().manual_seed(7))
    y_t, rot_score_q, _ = diffuser.forward_marginal(_rotate(Q, x0), t, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(y_t.rots, Q @ x_t.rots, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot_score_q, rot_score, rtol=0, atol=1e-12)

    z = torch.randn(64, 3, generator=g, dtype=F64)
    xt, s = diffuser.r3.forward_marginal(x0.trans, t, noise=z)
    yt, s_q = diffuser.r3.forward_marginal(x0.trans @ Q.T, t, noise=z @ Q.T)
    torch.testing.assert_close(yt, xt @ Q.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_q, s @ Q.T, rtol=0, atol=1e-12)
    # Scores from x0 commute as well (what a network predicting x0 equivariantly relies on).
    rs, ts = diffuser.scores_from_x0(x_t, x0, t)
    rs_q, ts_q = diffuser.scores_from_x0(_rotate(Q, x_t), _rotate(Q, x0), t)
    torch.testing.assert_close(rs_q, rs, rtol=0, atol=1e-10)
    torch.testing.assert_close(ts_q, ts @ Q.T, rtol=0, atol=1e-10)


def test_noising_does_not_commute_with_translations(diffuser):
    """The VP prior is centred: translating x0 by c moves x_t by a(t) c, not c; rotations and both
    scores are unchanged. This is why callers centre each window before noising."""
    g = torch.Generator().manual_seed(8)
    x0 = _random_frames((64,), g)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    t = 0.3
    x_t, rs, ts = diffuser.forward_marginal(x0, t, generator=torch.Generator().manual_seed(9))
    shifted = Rigid(x0.rots, x0.trans + c)
    y_t, rs_c, ts_c = diffuser.forward_marginal(shifted, t, generator=torch.Generator().manual_seed(9))
    a = diffuser.r3.mean_coef(t).item()
    torch.testing.assert_close(y_t.trans, x_t.trans + a * c, rtol=0, atol=1e-12)
    assert (y_t.trans - (x_t.trans + c)).norm(dim=-1).min() > 0.1
    torch.testing.assert_close(y_t.rots, x_t.rots, rtol=0, atol=0)
    torch.testing.assert_close(rs_c, rs, rtol=0, atol=0)
    torch.testing.assert_close(ts_c, ts, rtol=0, atol=1e-12)


def test_contextual_noise(diffuser):
    g = torch.Generator().manual_seed(10)
    x0 = _random_frames((2, 4, 2000), g)
    tau = diffuser.sample_context_tau((2, 4, 1), generator=g, dtype=F64)
    assert tau.shape == (2, 4, 1) and (tau >= 0).all() and (tau <= 0.1).all()
    noisy = diffuser.contextual_noise(x0, tau, generator=g)
    assert noisy.rots.shape == x0.rots.shape
    # Per-frame levels: translation spread matches sqrt(v(tau)) frame by frame.
    spread = (noisy.trans - diffuser.r3.mean_coef(tau)[..., None] * x0.trans).std(dim=(-1, -2))
    torch.testing.assert_close(spread, diffuser.r3.variance(tau[..., 0]).sqrt(), rtol=0.05, atol=1e-3)
    # tau = 0 leaves the frame exactly clean.
    at0 = diffuser.contextual_noise(x0, 0.0, generator=g)
    assert torch.equal(at0.trans, x0.trans)
    assert torch.equal(at0.rots, x0.rots)


@pytest.mark.parametrize("tau", [0.003, 0.02, 0.1])
def test_contextual_noise_rotations_are_the_forward_increment(diffuser, tau):
    """Rotations get IGSO(3)(sqrt(sigma(tau)^2 - sigma(0)^2)): the heat-kernel increment from t=0 to tau
    (this covers both the Gaussian branch below the table floor and the tabulated branch)."""
    g = torch.Generator().manual_seed(11)
    x0 = _random_frames((8000,), g)
    noisy = diffuser.contextual_noise(x0, tau, generator=g)
    sigma = math.sqrt(float(diffuser.so3.sigma(torch.tensor(tau, dtype=F64))) ** 2 - 0.1**2)
    angles = rotation_angle(x0.rots.transpose(-1, -2) @ noisy.rots).reshape(-1).numpy()
    assert stats.kstest(angles, igso3_angle_cdf(sigma)).pvalue > 1e-3
    # and not the full sigma(tau) marginal
    assert stats.kstest(angles, igso3_angle_cdf(sigma * 1.2)).pvalue < 1e-3


def test_time_grid(diffuser):
    ts = diffuser.time_grid(200)
    assert ts.shape == (201,) and ts[0] == 1.0 and abs(ts[-1].item() - 0.01) < 1e-15
    torch.testing.assert_close(ts[:-1] - ts[1:], torch.full((200,), 0.99 / 200, dtype=F64))
    with pytest.raises(ValueError, match="num_steps"):
        diffuser.time_grid(0)


def test_mismatched_frames_raise(diffuser):
    bad = Rigid(torch.eye(3).expand(4, 3, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="rigid0 has rots"):
        diffuser.forward_marginal(bad, 0.5)


def test_loss_scalings_are_rms_score_components(diffuser):
    x0 = _random_frames((20000,), torch.Generator().manual_seed(11))
    t = 0.25
    _, rs, ts = diffuser.forward_marginal(x0, t, generator=torch.Generator().manual_seed(12))
    assert abs((rs**2).mean().sqrt().item() / diffuser.rot_score_scaling(t).item() - 1) < 0.03
    assert abs((ts**2).mean().sqrt().item() / diffuser.trans_score_scaling(t).item() - 1) < 0.03


def _run_reverse(diffuser, x, target, ts, ode, generator):
    for k in range(len(ts) - 1):
        x = diffuser.reverse_step(x, target, ts[k], (ts[k] - ts[k + 1]).item(), ode=ode, generator=generator)
    return x


@pytest.mark.parametrize("ode", [False, True], ids=["sde", "ode"])
def test_reverse_process_reproduces_the_forward_marginal(diffuser, ode):
    """Started from the exact t = 1 marginal of fixed targets and driven by the exact x_0 oracle, the
    reverse SDE and the probability-flow ODE land on the forward marginal at t = 0.3 (KS)."""
    g = torch.Generator().manual_seed(13)
    target = _random_frames((800,), g)
    t_end = 0.3
    ts = torch.linspace(1.0, t_end, 141, dtype=F64)
    x = diffuser.forward_marginal(target, 1.0, generator=g)[0]
    x = _run_reverse(diffuser, x, target, ts, ode, g)
    angles = rotation_angle(target.rots.transpose(-1, -2) @ x.rots).numpy()
    sigma = diffuser.so3.sigma(t_end).item()
    assert stats.kstest(angles, igso3_angle_cdf(sigma)).pvalue > 1e-3
    a, v = diffuser.r3.mean_coef(t_end).item(), diffuser.r3.variance(t_end).item()
    z = ((x.trans - a * target.trans) / math.sqrt(v)).reshape(-1).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("ode", [False, True], ids=["sde", "ode"])
def test_reverse_process_from_the_prior_recovers_the_target(diffuser, ode):
    """From the prior, 200 steps to t_min = 0.01 with the exact oracle reach each target up to the
    forward process's own noise at t_min: sigma(0.01) = 0.13 rad (mean angle 0.21) and 0.045 nm per
    coordinate. Uniform Euler(-Maruyama) steps overshoot that floor a little (<= 25%)."""
    g = torch.Generator().manual_seed(14)
    target = _random_frames((600,), g)
    x = diffuser.sample_prior((600,), generator=g, dtype=F64)
    x = _run_reverse(diffuser, x, target, diffuser.time_grid(200), ode, g)
    angles = rotation_angle(target.rots.transpose(-1, -2) @ x.rots)
    assert angles.mean() < 0.26 and angles.max() < 0.8
    rms = (x.trans - target.trans).pow(2).mean().sqrt()
    assert rms < 0.06
    # Before: prior frames are ~1.7 rad and ~1.1 nm per coordinate away.


def test_time_outside_unit_interval_names_tau(diffuser):
    x0 = _random_frames((3,), torch.Generator().manual_seed(15))
    with pytest.raises(ValueError, match="tau=1.5 is outside the diffusion time range"):
        diffuser.contextual_noise(x0, 1.5)
    with pytest.raises(ValueError, match="tau has values in .* outside the diffusion time range"):
        diffuser.contextual_noise(x0, torch.tensor([0.05, -0.01, 0.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(diffuser):
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(16)
    x0 = Rigid(random_rotations((8, 100), generator=g, device=dev), torch.randn(8, 100, 3, generator=g, device=dev))
    t = torch.rand(8, 1, generator=g, device=dev) * 0.9 + 0.05
    x_t, rs, ts = diffuser.forward_marginal(x0, t, generator=g)
    assert x_t.rots.is_cuda and rs.is_cuda and ts.dtype == torch.float32
    rs2, ts2 = diffuser.scores_from_x0(x_t, x0, t)
    torch.testing.assert_close(rs2, rs, rtol=1e-3, atol=1e-3 * rs.abs().max().item())
    step = diffuser.reverse_step(x_t, x0, t, 0.01, generator=g)
    assert step.trans.is_cuda
    prior = diffuser.sample_prior((4,), generator=g, device=dev)
    assert prior.rots.device.type == "cuda"
