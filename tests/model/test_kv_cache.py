"""KV-cache exactness: cached rollout steps equal the full block-causal forward (float64)."""
import pytest
import torch

from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig

from .helpers import LAYOUTS, TINY, random_network, residues_of, training_layout

TOL = 1e-8


def _slot(frames: Rigid, i: int) -> Rigid:
    return Rigid(frames.rots[:, i], frames.trans[:, i])


def _rollout_vs_full(net, res, seq, L, mode, window):
    """Max |difference| between cached denoise outputs and the full forward, over all L frames."""
    with torch.no_grad():
        full = net(res, seq, window=window if mode == "window" else None)
        rollout = net.start_rollout(res, seq.dt_ns, mode=mode, window=window)
        worst = 0.0
        for l in range(L):
            x0 = net.denoise(rollout, _slot(seq.frames, L + l), seq.noise_level[:, L + l])
            worst = max(worst, (x0.trans - full.trans[:, L + l]).abs().max().item(),
                        (x0.rots - full.rots[:, L + l]).abs().max().item())
            anchor = None if seq.anchor_frames is None else _slot(seq.anchor_frames, l)
            net.append_clean(rollout, _slot(seq.frames, l), seq.noise_level[:, l], anchor=anchor)
    assert rollout.n_frames == L
    return worst


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode, window", [("full", None), ("window", 6), ("window", 2)])
def test_cached_rollout_equals_block_causal_forward(short_md, layout, mode, window):
    L = 6
    net = random_network(ModelConfig(**LAYOUTS[layout]))
    # history as the model sees it differs from the x0 anchors (the frames before contextual noise)
    seq = training_layout(short_md["frames"], L, batch=2, context_noise_nm=0.05)
    mask = torch.ones(seq.frames.trans.shape[2], dtype=torch.bool)
    mask[[0, 17]] = False
    res = residues_of(short_md, batch=2, mask=mask)
    assert _rollout_vs_full(net, res, seq, L, mode, window) < TOL


def test_window_matters(short_md):
    """Sanity of the test above: a window that bites changes the answer."""
    L = 5
    net = random_network(ModelConfig(**TINY))
    seq = training_layout(short_md["frames"], L)
    res = residues_of(short_md)
    with torch.no_grad():
        a, b = net(res, seq), net(res, seq, window=2)
    assert (a.trans[:, -1] - b.trans[:, -1]).abs().max() > 1e-6


def test_full_cache_grows_past_its_initial_capacity(short_md):
    L = 20  # initial capacity is 16 slots
    net = random_network(ModelConfig(**dict(TINY, blocks=1)))
    sub = Rigid(short_md["frames"].rots[:, :10], short_md["frames"].trans[:, :10])
    seq = training_layout(sub, L)
    md10 = {k: (v[:10] if torch.is_tensor(v) else v) for k, v in short_md.items() if k != "frames"}
    res = residues_of(md10)
    assert _rollout_vs_full(net, res, seq, L, "full", None) < TOL


def test_window_cache_memory_is_bounded(short_md):
    net = random_network(ModelConfig(**dict(TINY, blocks=1)))
    res = residues_of(short_md)
    frames = short_md["frames"]
    sizes = {}
    for mode in ("full", "window"):
        rollout = net.start_rollout(res, 0.1, mode=mode, window=3)
        with torch.no_grad():
            for l in range(40):
                net.append_clean(rollout, Rigid(frames.rots[l][None], frames.trans[l][None]), 0.0)
        sizes[mode] = rollout.cache.memory_bytes()
    assert rollout.cache.capacity == 4
    assert sizes["full"] >= 10 * sizes["window"]


def test_permuting_replicas_permutes_cached_outputs(short_md):
    L = 3
    net = random_network(ModelConfig(**LAYOUTS["paper_like"]))
    seq = training_layout(short_md["frames"], L, batch=3)
    # give every replica its own history
    trans = seq.frames.trans.clone()
    trans[:, :L] += 0.05 * torch.randn(trans[:, :L].shape, generator=torch.Generator().manual_seed(3), dtype=trans.dtype)
    frames = Rigid(seq.frames.rots, trans)
    res = residues_of(short_md, batch=3)
    perm = torch.tensor([1, 2, 0])

    def run(order):
        with torch.no_grad():
            rollout = net.start_rollout(res, 0.1, mode="window")
            for l in range(L):
                net.append_clean(rollout, Rigid(frames.rots[order, l], frames.trans[order, l]), seq.noise_level[order, l])
            return net.denoise(rollout, Rigid(frames.rots[order, L], frames.trans[order, L]), seq.noise_level[order, L])

    out, out_p = run(torch.arange(3)), run(perm)
    assert torch.allclose(out_p.trans, out.trans[perm], atol=1e-12, rtol=0)
    assert torch.allclose(out_p.rots, out.rots[perm], atol=1e-12, rtol=0)


def test_frames_must_be_appended_in_order(short_md):
    net = random_network(ModelConfig(**TINY))
    rollout = net.start_rollout(residues_of(short_md), 0.1, mode="full")
    rollout.cache.commit(0)
    with pytest.raises(ValueError, match="consecutively"):
        rollout.cache.commit(2)
