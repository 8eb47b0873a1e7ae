"""Properties of the full block-causal forward: SE(3) equivariance, no leaks, masks, batching."""
import pytest
import torch

from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig, StarMDNetwork
from openmm_starmd.model.sequence import TokenSequence

from .helpers import LAYOUTS, TINY, random_network, random_rigid_motion, residues_of, training_layout

L = 4


def _move(frames: Rigid, R, t) -> Rigid:
    return Rigid(R @ frames.rots, frames.trans @ R.T + t)


def _replace(seq: TokenSequence, **kw) -> TokenSequence:
    d = dict(seq.__dict__)
    d.update(kw)
    return TokenSequence(**d)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_se3_equivariance(short_md, layout, dtype, tol):
    net = random_network(ModelConfig(**LAYOUTS[layout]), dtype=dtype)
    frames = Rigid(short_md["frames"].rots.to(dtype), short_md["frames"].trans.to(dtype))
    seq = training_layout(frames, L, batch=2)
    res = residues_of(short_md, batch=2)
    R, t = random_rigid_motion(dtype)
    with torch.no_grad():
        out = net(res, seq)
        moved = net(res, _replace(seq, frames=_move(seq.frames, R, t)))
    expected = _move(out, R, t)
    assert (moved.trans - expected.trans).abs().max() < tol
    assert (moved.rots - expected.rots).abs().max() < tol
    # the prediction is not trivially the input
    assert (out.trans - seq.frames.trans).abs().max() > 1e-2


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 2])
def test_no_information_flows_back_in_time(short_md, layout, window):
    net = random_network(ModelConfig(**LAYOUTS[layout]))
    seq = training_layout(short_md["frames"], L)
    res = residues_of(short_md)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = net(res, seq, window=window)
        for l in range(L - 1):
            for slot in (l + 1, L + l + 1):  # clean frame l+1, noisy frame l+1
                trans = seq.frames.trans.clone()
                trans[:, slot] += torch.randn(trans[:, slot].shape, generator=g, dtype=trans.dtype)
                level = seq.noise_level.clone()
                level[:, slot] = 0.5 * level[:, slot]
                out = net(res, _replace(seq, frames=Rigid(seq.frames.rots, trans), noise_level=level), window=window)
                earlier = seq.frame_index <= l
                assert torch.equal(out.trans[:, earlier], base.trans[:, earlier]), (l, slot)
                assert torch.equal(out.rots[:, earlier], base.rots[:, earlier]), (l, slot)
                # ... while the future does see it: noisy frame l+1 sees itself, noisy l+2 sees clean l+1
                later = L + l + 1 if slot >= L else L + l + 2
                if later < 2 * L:
                    assert (out.trans[:, later] - base.trans[:, later]).abs().max() > 1e-6


def test_missing_residues_are_never_keys(short_md):
    net = random_network(ModelConfig(**TINY))
    seq = training_layout(short_md["frames"], L)
    mask = torch.ones(seq.frames.trans.shape[2], dtype=torch.bool)
    mask[[3, 20]] = False
    res = residues_of(short_md, mask=mask)
    trans = seq.frames.trans.clone()
    trans[:, :, [3, 20]] = float("nan")
    with torch.no_grad():
        a = net(res, seq)
        b = net(res, _replace(seq, frames=Rigid(seq.frames.rots, trans)))
    assert torch.isfinite(b.trans[:, :, mask]).all()
    assert torch.allclose(a.trans[:, :, mask], b.trans[:, :, mask], atol=1e-12, rtol=0)


def test_nan_at_valid_residue_is_refused(short_md):
    net = random_network(ModelConfig(**TINY))
    seq = training_layout(short_md["frames"], 2)
    trans = seq.frames.trans.clone()
    trans[0, 1, 4, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        net(residues_of(short_md), _replace(seq, frames=Rigid(seq.frames.rots, trans)))


def test_permuting_the_batch_permutes_the_outputs(short_md):
    net = random_network(ModelConfig(**TINY))
    seq = training_layout(short_md["frames"], L, batch=3)
    res = residues_of(short_md, batch=3)
    perm = torch.tensor([2, 0, 1])
    permuted = _replace(
        seq, frames=Rigid(seq.frames.rots[perm], seq.frames.trans[perm]), noise_level=seq.noise_level[perm],
        dt_ns=torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64)[perm],
    )
    seq = _replace(seq, dt_ns=torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64))
    with torch.no_grad():
        out = net(res, seq)
        out_p = net(res, permuted)
    assert torch.allclose(out_p.trans, out.trans[perm], atol=1e-12, rtol=0)
    assert torch.allclose(out_p.rots, out.rots[perm], atol=1e-12, rtol=0)


def test_dt_conditioning_and_its_ablation(short_md):
    seq = training_layout(short_md["frames"], 2)
    res = residues_of(short_md)
    for fixed, changes in ((None, True), (0.1, False)):
        net = random_network(ModelConfig(**TINY, fixed_dt_ns=fixed))
        with torch.no_grad():
            a = net(res, _replace(seq, dt_ns=torch.tensor([0.01], dtype=torch.float64)))
            b = net(res, _replace(seq, dt_ns=torch.tensor([10.0], dtype=torch.float64)))
        assert bool((a.trans - b.trans).abs().max() > 1e-6) == changes
    with pytest.raises(ValueError, match="dt_ns"):
        net(res, _replace(seq, dt_ns=torch.tensor([-1.0], dtype=torch.float64)))


def test_chains_are_distinguished(short_md):
    net = random_network(ModelConfig(**TINY))
    seq = training_layout(short_md["frames"], 2)
    one = residues_of(short_md)
    two = residues_of(short_md)
    two.chain_index[:, 24:] = 1
    with torch.no_grad():
        a, b = net(one, seq), net(two, seq)
    assert (a.trans[:, :, :24] - b.trans[:, :, :24]).abs().max() > 1e-6


def test_fresh_network_predicts_the_noisy_input_under_the_noisy_anchor(short_md):
    net = StarMDNetwork(ModelConfig(**TINY, x0_anchor="noisy")).double()
    seq = training_layout(short_md["frames"], 2)
    with torch.no_grad():
        out = net(residues_of(short_md), seq)
    assert torch.allclose(out.trans, seq.frames.trans) and torch.allclose(out.rots, seq.frames.rots)


def test_fresh_network_predicts_the_previous_clean_frame_under_the_previous_anchor(short_md):
    """Zero-initialised head: x0 of noisy frame f is clean frame f - 1; frame 0 (no predecessor) its own input."""
    net = StarMDNetwork(ModelConfig(**TINY)).double()
    assert net.config.x0_anchor == "previous"
    seq = training_layout(short_md["frames"], 3)  # slots: clean 0, 1, 2, noisy 0, 1, 2
    with torch.no_grad():
        out = net(residues_of(short_md), seq)
    expected = [0, 1, 2, 3, 0, 1]
    assert StarMDNetwork.anchor_slots(seq.frame_index, seq.noisy).tolist() == expected
    assert torch.allclose(out.trans, seq.frames.trans[:, expected])
    assert torch.allclose(out.rots, seq.frames.rots[:, expected])
    assert not torch.allclose(out.trans[:, 4], seq.frames.trans[:, 4])  # really not the noisy input


def test_previous_anchor_is_the_frame_before_contextual_noise(short_md):
    """With anchor_frames given, x0 of noisy frame f anchors on the un-noised frame f - 1, not on what the trunk saw."""
    net = StarMDNetwork(ModelConfig(**TINY)).double()
    seq = training_layout(short_md["frames"], 3, context_noise_nm=0.05)
    with torch.no_grad():
        out = net(residues_of(short_md), seq)
    assert torch.allclose(out.trans[:, 4:], seq.anchor_frames.trans[:, :2])
    assert torch.allclose(out.rots[:, 4:], seq.anchor_frames.rots[:, :2])
    assert not torch.allclose(out.trans[:, 4:], seq.frames.trans[:, :2])
    assert torch.allclose(out.trans[:, 3], seq.frames.trans[:, 3])  # frame 0: its own noisy input


def test_old_configs_without_an_anchor_load_as_noisy():
    d = ModelConfig(**TINY).to_dict()
    del d["x0_anchor"]
    assert ModelConfig.from_dict(d).x0_anchor == "noisy"
    with pytest.raises(ValueError, match="x0_anchor"):
        ModelConfig(**TINY, x0_anchor="last")


def test_bf16_autocast_keeps_geometry_in_float32(short_md):
    net = random_network(ModelConfig(**TINY), dtype=torch.float32)
    frames = Rigid(short_md["frames"].rots.float(), short_md["frames"].trans.float())
    seq = training_layout(frames, 2)
    res = residues_of(short_md)
    with torch.no_grad():
        ref = net(res, seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(res, seq)
    assert low.trans.dtype == torch.float32
    assert torch.isfinite(low.trans).all()
    assert (low.trans - ref.trans).abs().max() < 0.2  # bf16 trunk, float32 geometry


@pytest.mark.parametrize("name", ["default", "paper"])
def test_named_configs_build_and_run(short_md, name):
    from openmm_starmd.model import model_config

    net = StarMDNetwork(model_config(name)).double().eval()
    sub = Rigid(short_md["frames"].rots[:, :8], short_md["frames"].trans[:, :8])
    md8 = {k: (v[:8] if torch.is_tensor(v) else v) for k, v in short_md.items() if k != "frames"}
    with torch.no_grad():
        out = net(residues_of(md8), training_layout(sub, 2))
    assert out.trans.shape == (1, 4, 8, 3) and torch.isfinite(out.trans).all()
