"""Denoising losses vanish at the truth and grow with the error."""
import torch

from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.geometry.so3 import exp_map
from openmm_starmd.model.loss import denoising_loss, frame_losses
from openmm_starmd.model.sequence import training_sequence

from .helpers import residues_of


def test_losses_are_zero_at_the_truth_and_positive_elsewhere(short_md):
    diffuser = SE3Diffuser()
    f = short_md["frames"]
    clean = Rigid(f.rots[None, :3], f.trans[None, :3])
    mask = residues_of(short_md).mask
    t = torch.tensor([[0.1, 0.4, 0.8]], dtype=torch.float64)
    _, targets = training_sequence(diffuser, clean, mask, t, torch.ones(1, dtype=torch.float64),
                                   generator=torch.Generator().manual_seed(0))
    exact = denoising_loss(diffuser, clean, targets, mask, rot_score_weight=1.0)
    for key in ("loss", "trans_x0", "rot_x0", "rot_score"):
        assert exact[key].abs() < 1e-8, key
    wrong = Rigid(exp_map(torch.full_like(clean.trans, 0.1)) @ clean.rots, clean.trans + 0.05)
    off = denoising_loss(diffuser, wrong, targets, mask, rot_score_weight=1.0)
    assert torch.allclose(off["trans_x0"], torch.tensor(3 * 0.05**2, dtype=torch.float64))
    angle = torch.tensor(0.1 * 3**0.5, dtype=torch.float64)
    assert torch.allclose(off["rot_x0"], 4 * (1 - torch.cos(angle)))
    assert off["rot_score"] > 0


def test_missing_residues_do_not_count(short_md):
    f = short_md["frames"]
    a = Rigid(f.rots[None, :2], f.trans[None, :2])
    b = Rigid(a.rots.clone(), a.trans.clone())
    b.trans[:, :, 4] += 10.0
    mask = torch.ones(1, a.trans.shape[2], dtype=torch.bool)
    mask[0, 4] = False
    trans, rot = frame_losses(b, a, mask)
    assert trans == 0 and rot == 0
