"""The KV-cached autoregressive sampler: reproducibility, exact resume, replicas, errors."""
import json

import numpy as np
import pytest
import torch

from model.helpers import TINY, load_short_md, random_network, single_torch_thread
from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig, StarMDNetwork
from openmm_starmd.sampling import AutoregressiveSampler, SamplingConfig, time_grid

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def md():
    return load_short_md(torch.float64)


@pytest.fixture(scope="module")
def diffuser():
    return SE3Diffuser()


def _sampler(md, diffuser, net=None, n_replicas=1, seed=0, mask=None, pair_bounds=None, **config):
    net = net if net is not None else random_network(ModelConfig(**TINY), dtype=torch.float64)
    cfg = SamplingConfig(**{"steps": STEPS, **config})
    return AutoregressiveSampler(net, diffuser, md["aatype"], md["residue_index"], md["chain_index"], mask,
                                 md["dt_ns"], cfg, n_replicas=n_replicas, seed=seed, dtype=torch.float64,
                                 pair_bounds=pair_bounds)


def _frame(md, i, shift=0.0):
    return Rigid(md["frames"].rots[i], md["frames"].trans[i] + shift)


def test_fixed_seed_reproduces_a_rollout_bit_for_bit(md, diffuser):
    outs = []
    for _ in range(2):
        s = _sampler(md, diffuser, n_replicas=2, seed=11)
        s.add_history(_frame(md, 0))
        s.add_history(_frame(md, 1))
        outs.append(s.generate(3))
    assert torch.equal(outs[0].trans, outs[1].trans) and torch.equal(outs[0].rots, outs[1].rots)
    assert outs[0].trans.shape == (2, 3, md["frames"].trans.shape[1], 3)
    assert not torch.equal(outs[0].trans[0], outs[0].trans[1])  # replicas draw different noise
    other = _sampler(md, diffuser, n_replicas=2, seed=12)
    other.add_history(_frame(md, 0))
    other.add_history(_frame(md, 1))
    assert not torch.equal(other.generate(3).trans, outs[0].trans)


@pytest.mark.parametrize("mode, window, anchor_frames", [("window", 2, 1), ("full", None, 1), ("window", 2, 3)])
def test_resume_from_state_dict_continues_exactly(md, diffuser, mode, window, anchor_frames):
    net = random_network(ModelConfig(**TINY, anchor_frames=anchor_frames), dtype=torch.float64)
    a = _sampler(md, diffuser, net=net, n_replicas=2, seed=3, cache_mode=mode, window=window)
    a.add_history(_frame(md, 0))
    a.generate(6)  # longer than the window's reach, so truncated history is exercised
    state = a.state_dict()
    # plain data only
    for key, value in state.items():
        assert isinstance(value, (np.ndarray, int, float, str, dict, type(None))), key
    json.dumps({k: v for k, v in state.items() if not isinstance(v, np.ndarray)})
    uninterrupted = a.generate(3)
    b = _sampler(md, diffuser, net=net, n_replicas=2, seed=999, cache_mode=mode, window=window)
    b.load_state_dict(state)
    assert b.n_frames == 7
    resumed = b.generate(3)
    assert torch.equal(resumed.trans, uninterrupted.trans) and torch.equal(resumed.rots, uninterrupted.rots)


def test_state_of_another_sampler_is_refused(md, diffuser):
    a = _sampler(md, diffuser)
    a.add_history(_frame(md, 0))
    b = _sampler(md, diffuser, n_replicas=2)
    with pytest.raises(ValueError, match="n_replicas"):
        b.load_state_dict(a.state_dict())


def test_replicas_do_not_interact(md, diffuser):
    """Replica 0's rollout does not depend on what replica 1 is doing."""
    outs = []
    for other_start in (1, 50):
        s = _sampler(md, diffuser, n_replicas=2, seed=5)
        frames = [_frame(md, 0), _frame(md, other_start)]
        s.add_history(Rigid(torch.stack([f.rots for f in frames]), torch.stack([f.trans for f in frames])))
        outs.append(s.generate(3))
    assert torch.allclose(outs[0].trans[0], outs[1].trans[0], atol=1e-12, rtol=0)
    assert not torch.allclose(outs[0].trans[1], outs[1].trans[1])


def test_rollout_moves_with_the_protein(md, diffuser):
    """Translating the history translates the whole rollout (same seed): diffusion happens about the
    protein, not about the coordinate origin."""
    c = torch.tensor([35.0, -12.0, 60.0], dtype=torch.float64)
    outs = []
    for shift in (0.0, c):
        s = _sampler(md, diffuser, seed=8)
        s.add_history(_frame(md, 0, shift))
        s.add_history(_frame(md, 1, shift))
        outs.append(s.generate(3))
    assert torch.allclose(outs[1].trans - c, outs[0].trans, atol=1e-8)
    assert torch.allclose(outs[1].rots, outs[0].rots, atol=1e-8)


def test_window_and_full_cache_agree_while_the_window_does_not_bite(md, diffuser):
    net = random_network(ModelConfig(**TINY), dtype=torch.float64)
    outs = []
    for mode in ("window", "full"):
        s = _sampler(md, diffuser, net=net, seed=4, cache_mode=mode, window=8)
        s.add_history(_frame(md, 0))
        outs.append(s.generate(4))
    assert torch.allclose(outs[0].trans, outs[1].trans, atol=1e-8)


def test_untrained_network_keeps_frames_near_the_protein(md, diffuser):
    """A fresh network predicts x0 = x_t; the rollout must still be centred on the last frame."""
    s = _sampler(md, diffuser, net=StarMDNetwork(ModelConfig(**TINY)).double(), seed=2)
    s.add_history(_frame(md, 0, 20.0))
    out = s.generate(2)
    centre = md["frames"].trans[0].mean(0) + 20.0
    assert (out.trans.mean(2) - centre).norm(dim=-1).max() < 3.0  # 35 nm if diffused about the origin


def test_nan_frame_raises_and_is_not_appended(md, diffuser):
    net = random_network(ModelConfig(**TINY), dtype=torch.float64)
    s = _sampler(md, diffuser, net=net, seed=1)
    s.add_history(_frame(md, 0))
    s.generate(1)
    before = s.state_dict()
    with torch.no_grad():
        net.head.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="generated frame 1 of 2 .*not appended"):
        s.generate(2)
    assert s.n_frames == 2
    after = s.state_dict()
    assert np.array_equal(after["history_trans"], before["history_trans"])


def test_input_errors(md, diffuser):
    s = _sampler(md, diffuser)
    with pytest.raises(RuntimeError, match="add_history"):
        s.generate(1)
    with pytest.raises(ValueError, match="expected"):
        s.add_history(Rigid(md["frames"].rots[0, :10], md["frames"].trans[0, :10]))
    bad = md["frames"].trans[0].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.add_history(Rigid(md["frames"].rots[0], bad))
    with pytest.raises(ValueError, match="dt_ns"):
        AutoregressiveSampler(StarMDNetwork(ModelConfig(**TINY)), diffuser, md["aatype"], md["residue_index"],
                              md["chain_index"], None, 0.0)


def test_missing_residues_ride_along(md, diffuser):
    mask = torch.ones(md["frames"].trans.shape[1], dtype=torch.bool)
    mask[[0, 7]] = False
    s = _sampler(md, diffuser, mask=mask, seed=6)
    frame = _frame(md, 0)
    trans = frame.trans.clone()
    trans[[0, 7]] = float("nan")  # missing atoms may come in as NaN
    s.add_history(Rigid(frame.rots, trans))
    out = s.generate(2)
    assert torch.isfinite(out.trans[:, :, mask]).all()


def test_sampling_config_round_trip_and_validation():
    c = SamplingConfig(steps=7, ode=True, noise_scale=0.5, cache_mode="full", window=4)
    assert SamplingConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in (dict(steps=0), dict(cache_mode="lru"), dict(t_min=1.5), dict(window=0), dict(context_tau_max=-1)):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        SamplingConfig.from_dict({"step": 3})


def test_time_grid():
    ts = time_grid(20, 0.01)
    assert len(ts) == 20 and ts[0] == 1.0 and abs(ts[-1] - 0.01) < 1e-15
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-2] - ts[-1] < ts[0] - ts[1]  # denser at small t
    assert time_grid(1, 0.01) == [0.01]


def test_default_grid_resolves_a_narrow_gaussian_with_an_exact_denoiser(diffuser):
    """Translations: target N(mu, s² I) with s = 0.1 nm (an MD frame given its history), the exact
    posterior mean as x0, the default steps and grid through SE3Diffuser.reverse_step: the output
    spread must be right within 25% and unbiased (a uniform grid gives ~2x too broad here)."""
    s, M = 0.1, 4000
    cfg = SamplingConfig()
    r3 = diffuser.r3
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    x = diffuser.sample_prior((M,), generator=g, dtype=torch.float64)
    times = time_grid(cfg.steps, cfg.t_min)
    for k, t in enumerate(times):
        a, v = r3.mean_coef(t).item(), r3.variance(t).item()
        x0 = Rigid(x.rots, mu + a * s**2 / (a * a * s**2 + v) * (x.trans - a * mu))
        if k == len(times) - 1:
            break
        x = diffuser.reverse_step(x, x0, t, t - times[k + 1], generator=g)
    ratio = x0.trans.std(0).mean().item() / s
    assert 0.75 < ratio < 1.25, ratio
    assert (x0.trans.mean(0) - mu).norm() < 0.02


def test_pair_bounds_hold_in_every_generated_frame_and_in_the_history(md, diffuser):
    """Bounds tighter than the real distances: every generated frame is projected before it becomes
    history, the same seed without bounds gives a different rollout, and bad pairs are named."""
    x = md["frames"].trans[0]
    pairs = torch.tensor([[0, 10], [5, 20]])
    d0 = torch.linalg.vector_norm(x[pairs[:, 1]] - x[pairs[:, 0]], dim=-1)
    lo, hi = 0.9 * d0 - 0.05, 0.9 * d0  # the MD start sits just outside
    s = _sampler(md, diffuser, n_replicas=2, seed=3, pair_bounds=(pairs, lo, hi))
    s.add_history(_frame(md, 0))
    out = s.generate(4)
    d = torch.linalg.vector_norm(out.trans[..., pairs[:, 1], :] - out.trans[..., pairs[:, 0], :], dim=-1)
    assert bool(((d >= lo - 1e-9) & (d <= hi + 1e-9)).all())
    free = _sampler(md, diffuser, n_replicas=2, seed=3)
    free.add_history(_frame(md, 0))
    assert not torch.allclose(free.generate(4).trans, out.trans)
    with pytest.raises(ValueError, match="disjoint"):
        _sampler(md, diffuser, pair_bounds=([[0, 1], [1, 2]], 0.4, 0.6))


def test_ca_geometry_holds_the_chain_and_resumes_exactly(md, diffuser):
    """ca_geometry: every generated frame (and so the history) is inside the Cα bounds while the
    network's own frames (return_raw) are not; off, the two are the same; resume stays exact."""
    from openmm_starmd.geometry.ca_constraints import CHAIN_CA_RANGE_NM, MIN_NONBONDED_CA_NM

    net = random_network(ModelConfig(**TINY), dtype=torch.float64)
    s = AutoregressiveSampler(net, diffuser, md["aatype"], md["residue_index"], md["chain_index"], None, md["dt_ns"],
                              SamplingConfig(steps=STEPS), n_replicas=2, seed=4, dtype=torch.float64, ca_geometry=True)
    s.add_history(_frame(md, 0))
    kept, raw = s.generate(3, return_raw=True)
    link = torch.linalg.vector_norm(kept.trans[..., 1:, :] - kept.trans[..., :-1, :], dim=-1)
    tol = 1e-4
    assert bool((link >= CHAIN_CA_RANGE_NM[0] - tol).all() and (link <= CHAIN_CA_RANGE_NM[1] + tol).all())
    R = torch.cdist(kept.trans, kept.trans)
    far = (torch.arange(R.shape[-1])[:, None] - torch.arange(R.shape[-1])[None]).abs() >= 2
    assert bool((R[..., far] >= MIN_NONBONDED_CA_NM - tol).all())
    raw_link = torch.linalg.vector_norm(raw.trans[..., 1:, :] - raw.trans[..., :-1, :], dim=-1)
    assert float(raw_link.max()) > CHAIN_CA_RANGE_NM[1] + 0.01  # an untrained network breaks the chain
    assert torch.equal(kept.rots, raw.rots) and s.ca_projection["moved"] == s.ca_projection["frames"] == 3
    state = s.state_dict()
    uninterrupted = s.generate(2)
    b = AutoregressiveSampler(net, diffuser, md["aatype"], md["residue_index"], md["chain_index"], None, md["dt_ns"],
                              SamplingConfig(steps=STEPS), n_replicas=2, seed=0, dtype=torch.float64, ca_geometry=True)
    b.load_state_dict(state)
    assert torch.equal(b.generate(2).trans, uninterrupted.trans)
    off = _sampler(md, diffuser, net=net, n_replicas=2, seed=4)
    off.add_history(_frame(md, 0))
    a, r = off.generate(2, return_raw=True)
    assert torch.equal(a.trans, r.trans) and not torch.allclose(a.trans, kept.trans[:, :2])
    # a rollout continues only with the projection setting it was made with, either way
    with pytest.raises(ValueError, match="ca_geometry=False"):
        b2 = _sampler(md, diffuser, net=net, n_replicas=2)
        b2.ca_geometry = True
        b2.load_state_dict(off.state_dict())
    with pytest.raises(ValueError, match="ca_geometry=True"):
        _sampler(md, diffuser, net=net, n_replicas=2).load_state_dict(state)
