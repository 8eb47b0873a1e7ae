"""Helpers for the model tests: real frames from the short 1ENH MD and randomised networks.

A freshly built network is the identity map (adaLN-Zero gates and the output head start at
zero), which would make every property test trivially true; ``random_network`` therefore draws
every parameter at random with a fixed seed.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from openmm_starmd.geometry.frames import frames_from_backbone
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ModelConfig, ResidueFeatures, StarMDNetwork
from openmm_starmd.model.sequence import AA_ORDER, TokenSequence

SHORT_MD = Path(__file__).parents[1] / "data" / "short_md_1enh.npz"


@contextmanager
def single_torch_thread():
    """Run torch on one thread, then restore the setting. The small tensors of these tests run
    ~100x slower with 2 OpenMP threads on a busy 2-core machine (barrier spinning) than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_short_md(dtype=torch.float64):
    """Frames (F, N) in nm, per-residue arrays and frame spacing of tests/data/short_md_1enh.npz."""
    d = np.load(SHORT_MD)
    bb = torch.as_tensor(d["backbone_nm"], dtype=dtype)
    frames = frames_from_backbone(bb[..., 0, :], bb[..., 1, :], bb[..., 2, :])
    aatype = torch.tensor([AA_ORDER.index(a) for a in str(d["sequence"])])
    return {
        "frames": frames,
        "aatype": aatype,
        "residue_index": torch.as_tensor(d["residue_index"]),
        "chain_index": torch.as_tensor(d["chain_index"]),
        "dt_ns": float(d["frame_spacing_ns"]),
    }


def random_network(config: ModelConfig, dtype=torch.float64, seed: int = 0) -> StarMDNetwork:
    """A network with every parameter drawn at random (fixed seed), in eval mode."""
    torch.manual_seed(seed)
    net = StarMDNetwork(config).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("point_logit"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * (0.7 / math.sqrt(p.shape[-1])))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.1)
    return net.eval()


def random_rigid_motion(dtype=torch.float64, seed: int = 1):
    """One random rotation (3, 3) and translation (3,) in nm."""
    from openmm_starmd.geometry.so3 import random_rotations

    g = torch.Generator().manual_seed(seed)
    return random_rotations((), generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype) * 3.0


def training_layout(frames: Rigid, L: int, start: int = 0, seed: int = 0, batch: int = 1, dt_ns: float = 0.1,
                    context_noise_nm: float = 0.0):
    """A [clean 0..L-1, noisy 0..L-1] sequence from real frames, noisy frames = real + noise.

    ``context_noise_nm > 0`` perturbs the clean slots' frames (a stand-in for contextual noise)
    and records the unperturbed ones as ``anchor_frames``.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = frames.trans.dtype
    clean = Rigid(frames.rots[start : start + L], frames.trans[start : start + L])
    from openmm_starmd.geometry.so3 import exp_map

    N = clean.trans.shape[1]
    rots_n = exp_map(torch.randn(batch, L, N, 3, generator=g, dtype=dtype)) @ clean.rots
    trans_n = clean.trans + torch.randn(batch, L, N, 3, generator=g, dtype=dtype) * 0.3
    rots = torch.cat([clean.rots.expand(batch, L, N, 3, 3), rots_n], 1)
    trans = torch.cat([clean.trans.expand(batch, L, N, 3), trans_n], 1)
    level = torch.rand(batch, 2 * L, generator=g, dtype=dtype)
    anchors = None
    if context_noise_nm > 0:
        anchors = Rigid(rots.clone(), trans.clone())
        rots = rots.clone()
        trans = trans.clone()
        rots[:, :L] = exp_map(0.1 * torch.randn(batch, L, N, 3, generator=g, dtype=dtype)) @ rots[:, :L]
        trans[:, :L] = trans[:, :L] + context_noise_nm * torch.randn(batch, L, N, 3, generator=g, dtype=dtype)
    return TokenSequence(
        frames=Rigid(rots, trans),
        frame_index=torch.arange(L).repeat(2),
        noisy=torch.arange(2 * L) >= L,
        noise_level=level,
        dt_ns=torch.full((batch,), dt_ns, dtype=dtype),
        anchor_frames=anchors,
    )


def residues_of(md, batch: int = 1, mask=None) -> ResidueFeatures:
    return ResidueFeatures.build(md["aatype"], md["residue_index"], md["chain_index"], mask=mask, batch=batch)


TINY = dict(width=32, heads=4, blocks=2, query_points=2, value_points=3, time_fourier=4, dt_fourier=4)
LAYOUTS = {
    "joint": dict(TINY),
    "paper_like": dict(TINY, blocks=1, frame_layers=1, joint_layers=2),
    "separable": dict(TINY, attention="separable"),
    "noisy_anchor": dict(TINY, x0_anchor="noisy"),
    "posterior_anchor": dict(TINY, x0_anchor="posterior"),
    "posterior_history_mean": dict(TINY, x0_anchor="posterior", anchor_frames=3),
    # dt_ns 0.1 in these tests: the prior is 5^0.25 = 1.5x wider than at its reference
    "posterior_dt_prior": dict(TINY, x0_anchor="posterior", anchor_frames=3, anchor_prior_dt_exponent=0.25,
                               anchor_prior_dt_ref_ns=0.02),
}
