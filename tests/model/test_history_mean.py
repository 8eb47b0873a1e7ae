"""The history-mean x0 anchor (ModelConfig.anchor_frames > 1): weights, means, and the network."""
import pytest
import torch

from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.geometry.so3 import log_map
from openmm_starmd.model import ModelConfig, StarMDNetwork
from openmm_starmd.model.anchor import history_weights, mean_frames

from .helpers import TINY, random_network, random_rigid_motion, residues_of, training_layout


def test_weights_average_the_last_h_clean_frames_before_each_noisy_one():
    L = 5
    w = history_weights(torch.arange(L).repeat(2), torch.arange(2 * L) >= L, frames=3)
    assert torch.allclose(w.sum(1), torch.ones(2 * L, dtype=torch.float64))
    assert torch.equal(w[:L], torch.eye(2 * L, dtype=torch.float64)[:L])  # clean slots keep their own frame
    assert torch.equal(w[L], torch.eye(2 * L, dtype=torch.float64)[L])  # noisy frame 0: no history
    assert w[L + 1, :L].tolist() == [1, 0, 0, 0, 0]
    assert w[L + 2, :L].tolist() == [0.5, 0.5, 0, 0, 0]
    assert w[L + 4, :L].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 0])
    assert (w[L:, L:] == 0).sum() == L * L - 1  # noisy slots never average noisy ones (only frame 0 itself)


def test_mean_of_frames_is_the_chordal_mean_and_equivariant(short_md):
    frames = short_md["frames"]
    rots, trans = frames.rots[None, :4], frames.trans[None, :4]  # (1, T=4, N)
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mean = mean_frames(rots, trans, w)
    assert torch.allclose(mean.trans[0, 0], trans[0].mean(0))
    R = mean.rots[0, 0]
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(R.shape[0], dtype=R.dtype))
    # the chordal mean of rotations a few degrees apart lies between them: first-order tangent mean
    tangent = log_map(rots[0, 0].transpose(-1, -2) @ rots[0]).mean(0)
    assert (log_map(rots[0, 0].transpose(-1, -2) @ R) - tangent).abs().max() < 2e-3
    assert torch.equal(mean.rots[0, 1], rots[0, 1]) and torch.equal(mean.trans[0, 1], trans[0, 1])  # exact pick
    Q, v = random_rigid_motion()
    moved = mean_frames(Q @ rots, trans @ Q.T + v, w)
    assert torch.allclose(moved.trans, mean.trans @ Q.T + v, atol=1e-12)
    assert torch.allclose(moved.rots, Q @ mean.rots, atol=1e-12)


def test_fresh_network_predicts_the_mean_of_the_last_frames_before_contextual_noise(short_md):
    """Zero-initialised head under "previous" with anchor_frames=2: x0 of noisy frame f is the mean of
    the un-noised clean frames f - 2 and f - 1 (frame 1: frame 0 alone)."""
    net = StarMDNetwork(ModelConfig(**TINY, anchor_frames=2)).double()
    seq = training_layout(short_md["frames"], 4, context_noise_nm=0.05)
    with torch.no_grad():
        out = net(residues_of(short_md), seq)
    clean = seq.anchor_frames
    assert torch.equal(out.trans[:, 5], clean.trans[:, 0]) and torch.equal(out.rots[:, 5], clean.rots[:, 0])
    for f in (2, 3):
        assert torch.allclose(out.trans[:, 4 + f], (clean.trans[:, f - 2] + clean.trans[:, f - 1]) / 2)
        expect = mean_frames(clean.rots[:, f - 2:f], clean.trans[:, f - 2:f], torch.full((1, 2), 0.5)).rots[:, 0]
        assert torch.allclose(out.rots[:, 4 + f], expect)
    assert not torch.allclose(out.trans[:, 7], clean.trans[:, 2])  # really not the previous frame
    # one anchor frame is the previous frame, bit for bit
    prev = StarMDNetwork(ModelConfig(**TINY, anchor_frames=1)).double()
    with torch.no_grad():
        assert torch.equal(prev(residues_of(short_md), seq).trans[:, 5:], clean.trans[:, :3])


def test_rollout_keeps_only_the_last_h_anchor_frames(short_md):
    net = random_network(ModelConfig(**TINY, anchor_frames=3))
    res = residues_of(short_md)
    rollout = net.start_rollout(res, 0.1)
    frames = short_md["frames"]
    with torch.no_grad():
        for i in range(5):
            net.append_clean(rollout, Rigid(frames.rots[i][None], frames.trans[i][None]), 0.0)
    assert len(rollout.anchors) == 3
    assert torch.equal(rollout.anchors[0].trans[0], frames.trans[2]) and torch.equal(rollout.anchor.trans[0], frames.trans[4])


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_anchor_frames_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="anchor_frames"):
        ModelConfig(**TINY, anchor_frames=bad)


def test_history_mean_stays_in_float32_under_bf16_autocast(short_md):
    """A fresh network returns the mean itself; under autocast it must not be computed in bf16
    (which would move Cα by ~0.01 nm)."""
    net = StarMDNetwork(ModelConfig(**TINY, anchor_frames=3)).float()
    frames = Rigid(short_md["frames"].rots.float(), short_md["frames"].trans.float())
    seq = training_layout(frames, 4, context_noise_nm=0.05)
    res = residues_of(short_md)
    with torch.no_grad():
        ref = net(res, seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(res, seq)
        rollout = net.start_rollout(res, seq.dt_ns)
        for i in range(3):
            net.append_clean(rollout, Rigid(seq.frames.rots[:, i], seq.frames.trans[:, i]), 0.0,
                             anchor=Rigid(seq.anchor_frames.rots[:, i], seq.anchor_frames.trans[:, i]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached = net.denoise(rollout, Rigid(seq.frames.rots[:, 7], seq.frames.trans[:, 7]), 0.5)
    assert (low.trans - ref.trans).abs().max() < 1e-5
    assert (cached.trans - ref.trans[:, 7]).abs().max() < 1e-5
