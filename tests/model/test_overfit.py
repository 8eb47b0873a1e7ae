"""A small STAR-MD network overfits one short real MD trajectory (tests/data/short_md_1enh.npz).

This is the end-to-end check that the pieces fit: the block-causal [clean, noisy] training
sequence from real frames, the SE(3) diffuser's forward process, the network and the denoising
loss. The x0 loss on a fixed evaluation batch (fixed windows, times and noise) must fall at least
10x within a few hundred Adam steps on CPU.

The evaluation scores frames 1..L-1 of each window, the ones with history: the first frame of a
window has none, and at large t its orientation is unknowable (its loss floor is ~O(1)), which
is not what an MD emulator is asked to do.

It uses ``x0_anchor="noisy"``: with the default "previous" anchor a fresh network already
predicts the previous frame, which on this 0.05 ps trajectory is within thermal jitter of the
target, so there is no 10x to fall (that anchor is compared on real training data instead).
"""
import torch

from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig, StarMDNetwork, training_sequence
from openmm_starmd.model.loss import denoising_loss, frame_losses

from .helpers import load_short_md, residues_of

L, BATCH, STEPS, LR = 4, 4, 250, 1e-2


def _batch(md, diffuser, generator, starts=None, t=None):
    frames = md["frames"]
    F = frames.trans.shape[0]
    if starts is None:
        starts = torch.randint(0, F - L + 1, (BATCH,), generator=generator)
    idx = starts[:, None] + torch.arange(L)
    clean = Rigid(frames.rots[idx], frames.trans[idx])
    if t is None:
        t = 0.01 + 0.99 * torch.rand(BATCH, L, generator=generator)
    res = residues_of(md, batch=BATCH)
    seq, targets = training_sequence(
        diffuser, clean, res.mask, t, torch.full((BATCH,), md["dt_ns"]), tau=None, generator=generator
    )
    return res, seq, targets


def _eval_loss(net, res, seq, targets):
    """x0 loss (nm² + chordal) on noisy frames 1..L-1."""
    out = net(res, seq)
    pred = Rigid(out.rots[:, L + 1 :], out.trans[:, L + 1 :])
    true = Rigid(targets.x0.rots[:, 1:], targets.x0.trans[:, 1:])
    trans, rot = frame_losses(pred, true, res.mask)
    return (trans + rot).item()


def test_small_model_overfits_a_short_real_trajectory():
    torch.manual_seed(0)
    md = load_short_md(torch.float32)
    md["frames"] = Rigid(md["frames"].rots[:40], md["frames"].trans[:40])  # 2 ps
    diffuser = SE3Diffuser()
    net = StarMDNetwork(ModelConfig(width=32, heads=4, blocks=2, query_points=4, value_points=4,
                                    time_fourier=8, dt_fourier=4, window=L, x0_anchor="noisy"))
    eval_batch = _batch(md, diffuser, torch.Generator().manual_seed(123), starts=torch.tensor([0, 11, 22, 33]),
                        t=torch.linspace(0.05, 0.95, BATCH * L).reshape(BATCH, L))
    with torch.no_grad():
        before = _eval_loss(net, *eval_batch)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (STEPS + 1))
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        res, seq, targets = _batch(md, diffuser, g)
        out = net(res, seq)
        loss = denoising_loss(diffuser, Rigid(out.rots[:, L:], out.trans[:, L:]), targets, res.mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        after = _eval_loss(net, *eval_batch)
    assert after < before / 10, (before, after)
