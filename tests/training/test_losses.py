"""training/losses.py: FrameDiff's denoising loss and the auxiliary backbone losses on real frames.

Windows come from the real 1ENH trajectory (tests/data/short_md_1enh.npz); targets from the shared
``training_sequence``. Properties: exact zeros for a perfect prediction (with finite gradients),
known values for a known displacement, SE(3) invariance of the distance map and FAPE, the t filter
of the auxiliary terms, the x0/score switch of the translation loss and the documented weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.frames import backbone_from_frames, frames_from_backbone
from openmm_starmd.geometry.rigid import Rigid, apply
from openmm_starmd.geometry.so3 import random_rotations
from openmm_starmd.model.sequence import training_sequence
from training_helpers import load_training_module

losses = load_training_module("losses")
SHORT_MD = Path(__file__).parents[1] / "data" / "short_md_1enh.npz"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def window():
    """Two windows of L=3 real frames (float64), mask, chains and targets at given times."""
    d = np.load(SHORT_MD)
    bb = torch.as_tensor(d["backbone_nm"], dtype=torch.float64)
    idx = torch.tensor([[0, 5, 10], [40, 45, 50]])
    frames = frames_from_backbone(bb[idx, :, 0], bb[idx, :, 1], bb[idx, :, 2])
    B, L, N = frames.trans.shape[:3]
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 7] = False  # one missing residue: it must not count anywhere
    chains = torch.as_tensor(d["chain_index"]).expand(B, N)
    return frames, mask, chains


def _targets(frames, mask, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, targets = training_sequence(SE3Diffuser(), frames, mask, t, torch.full((t.shape[0],), 0.1), generator=g)
    return targets


def test_perfect_prediction_scores_zero_with_finite_gradients(window):
    frames, mask, chains = window
    t = torch.tensor([[0.05, 0.2, 0.6], [0.1, 0.9, 0.24]], dtype=torch.float64)
    targets = _targets(frames, mask, t)
    pred = Rigid(frames.rots.clone().requires_grad_(True), frames.trans.clone().requires_grad_(True))
    cfg = losses.LossConfig(fape_weight=0.5)
    out = losses.starmd_loss(SE3Diffuser(), pred, targets, mask, chains, cfg)
    assert float(out["trans"]) == 0.0
    assert float(out["bb_atom"]) == 0.0
    assert float(out["fape"]) == pytest.approx(1e-3)  # AlphaFold's epsilon floor sqrt(1e-6) nm / 1 nm
    assert float(out["dist_mat"]) < 1e-12
    # the score implied by the true x0 is the conditional score the diffuser returned
    assert float(out["rot"]) < 1e-12
    out["loss"].backward()
    assert torch.isfinite(pred.rots.grad).all() and torch.isfinite(pred.trans.grad).all()


def test_known_displacement_gives_known_values_in_documented_units(window):
    frames, mask, chains = window
    t = torch.full((2, 3), 0.1, dtype=torch.float64)
    targets = _targets(frames, mask, t)
    shift = torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64)  # 0.1 nm = 1 Å
    pred = Rigid(frames.rots, frames.trans + shift)
    out = losses.starmd_loss(SE3Diffuser(), pred, targets, mask, chains)
    assert float(out["trans"]) == pytest.approx(0.01, rel=1e-9)  # nm^2
    assert float(out["bb_atom"]) == pytest.approx(1.0, rel=1e-9)  # Å^2
    assert float(out["dist_mat"]) < 1e-10  # a rigid shift keeps every distance
    assert math.isnan(float(out["fape"]))  # off by default


def test_distance_map_and_fape_are_invariant_to_a_rigid_motion_of_the_prediction(window):
    frames, mask, chains = window
    g = torch.Generator().manual_seed(3)
    noisy = Rigid(frames.rots, frames.trans + 0.05 * torch.randn(frames.trans.shape, generator=g, dtype=torch.float64))
    K = 6
    pred = Rigid(noisy.rots.reshape(K, -1, 3, 3), noisy.trans.reshape(K, -1, 3))
    true = Rigid(frames.rots.reshape(K, -1, 3, 3), frames.trans.reshape(K, -1, 3))
    m = mask[:, None].expand(2, 3, -1).reshape(K, -1)
    c = chains[:, None].expand(2, 3, -1).reshape(K, -1)
    q = random_rotations((), generator=g, dtype=torch.float64)
    moved = Rigid(q @ pred.rots, pred.trans @ q.T + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    atoms = lambda r: backbone_from_frames(r, chain_index=c)
    dm = losses.distance_map_loss(atoms(pred), atoms(true), m, 0.6)
    dm_moved = losses.distance_map_loss(atoms(moved), atoms(true), m, 0.6)
    torch.testing.assert_close(dm_moved, dm, rtol=1e-9, atol=1e-12)
    fape = losses.backbone_fape(pred, true, m, 1.0)
    torch.testing.assert_close(losses.backbone_fape(moved, true, m, 1.0), fape, rtol=1e-9, atol=1e-12)
    assert (dm > 0).all() and (fape > 0).all()
    # the atom loss is not invariant: it sees the motion
    assert (losses.backbone_atom_loss(atoms(moved), atoms(true), m) > losses.backbone_atom_loss(atoms(pred), atoms(true), m)).all()


def test_auxiliary_terms_apply_only_at_small_t_and_weights_are_as_documented(window):
    frames, mask, chains = window
    g = torch.Generator().manual_seed(5)
    pred = Rigid(frames.rots, frames.trans + 0.03 * torch.randn(frames.trans.shape, generator=g, dtype=torch.float64))
    diffuser = SE3Diffuser()
    # no frame at t <= 0.25: the auxiliary terms are absent
    big_t = torch.tensor([[0.3, 0.5, 0.9], [0.26, 0.7, 1.0]], dtype=torch.float64)
    out = losses.starmd_loss(diffuser, pred, _targets(frames, mask, big_t), mask, chains)
    assert math.isnan(float(out["bb_atom"])) and math.isnan(float(out["dist_mat"]))
    assert float(out["loss"]) == pytest.approx(float(out["trans"]) + 0.5 * float(out["rot"]), rel=1e-12)
    # every frame at small t: loss = trans + 0.5 rot + 0.25 (bb_atom + dist_mat), frame means
    small_t = torch.tensor([[0.02, 0.1, 0.25], [0.05, 0.15, 0.2]], dtype=torch.float64)
    out = losses.starmd_loss(diffuser, pred, _targets(frames, mask, small_t), mask, chains)
    expected = out["trans"] + 0.5 * out["rot"] + 0.25 * (out["bb_atom"] + out["dist_mat"])
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-12)
    # FAPE, when switched on, has its own weight (FrameDiff's), not scaled by the 0.25
    out = losses.starmd_loss(diffuser, pred, _targets(frames, mask, small_t), mask, chains, losses.LossConfig(fape_weight=0.5))
    assert float(out["loss"]) == pytest.approx(float(expected + 0.5 * out["fape"]), rel=1e-12)
    # mixed: one aux frame of six
    mixed = torch.tensor([[0.02, 0.5, 0.6], [0.7, 0.8, 0.9]], dtype=torch.float64)
    only = losses.starmd_loss(diffuser, pred, _targets(frames, mask, mixed), mask, chains)
    plain = losses.starmd_loss(diffuser, pred, _targets(frames, mask, mixed), mask, chains, losses.LossConfig(aux_weight=0.0))
    assert math.isnan(float(only["bb_atom"]))  # the aux frame is frame 0, untrained by default
    every = losses.LossConfig(first_frame_weight=1.0)
    only = losses.starmd_loss(diffuser, pred, _targets(frames, mask, mixed), mask, chains, every)
    plain = losses.starmd_loss(diffuser, pred, _targets(frames, mask, mixed), mask, chains,
                               losses.LossConfig(aux_weight=0.0, first_frame_weight=1.0))
    extra = 0.25 * (only["bb_atom"] + only["dist_mat"]) / 6
    assert float(only["loss"] - plain["loss"]) == pytest.approx(float(extra), rel=1e-9)


def test_translation_score_loss_above_the_threshold(window):
    frames, mask, chains = window
    diffuser = SE3Diffuser()
    t = torch.tensor([[0.3, 0.6, 0.9], [0.4, 0.5, 0.8]], dtype=torch.float64)
    targets = _targets(frames, mask, t)
    g = torch.Generator().manual_seed(9)
    pred = Rigid(frames.rots, frames.trans + 0.02 * torch.randn(frames.trans.shape, generator=g, dtype=torch.float64))
    out = losses.starmd_loss(diffuser, pred, targets, mask, chains, losses.LossConfig(trans_x0_threshold=0.0))
    # VP-SDE: the score error is a(t) (x0_pred - x0) / v(t) and the scaling 1/sqrt(v(t)), so the
    # scaled squared error is a(t)^2 / v(t) times the x0 error
    _, s_pred = diffuser.scores_from_x0(targets.noisy_shifted, Rigid(pred.rots, pred.trans - targets.origins[..., None, :]),
                                        t[..., None])
    scale = diffuser.trans_score_scaling(t[..., None])[..., None]
    per_res = (((s_pred - targets.trans_score) / scale) ** 2).sum(-1)
    m = mask[:, None].expand(2, 3, -1).double()
    manual = ((per_res * m).sum(-1) / m.sum(-1))[:, 1:].mean()  # frame 0 is not trained by default
    assert float(out["trans"]) == pytest.approx(float(manual), rel=1e-9)
    x0 = losses.starmd_loss(diffuser, pred, targets, mask, chains)
    assert float(out["trans"]) != pytest.approx(float(x0["trans"]))


def test_masked_residues_do_not_count(window):
    frames, mask, chains = window
    t = torch.full((2, 3), 0.1, dtype=torch.float64)
    targets = _targets(frames, mask, t)
    trans = frames.trans.clone()
    trans[1, :, 7] += 5.0  # a wild prediction at the missing residue only
    out = losses.starmd_loss(SE3Diffuser(), Rigid(frames.rots, trans), targets, mask, chains, losses.LossConfig(fape_weight=0.5))
    for key in ("trans", "bb_atom", "dist_mat"):
        assert float(out[key]) < 1e-6, key
    assert float(out["fape"]) == pytest.approx(1e-3)  # the epsilon floor only


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="rot_weight"):
        losses.LossConfig(rot_weight=-1.0)


def test_frame_zero_has_no_history_and_is_not_trained_by_default(window):
    """first_frame_weight=0: frame 0's prediction does not touch the loss; 1 trains it like the others."""
    frames, mask, chains = window
    diffuser = SE3Diffuser()
    t = torch.tensor([[0.3, 0.6, 0.9], [0.4, 0.5, 0.8]], dtype=torch.float64)
    targets = _targets(frames, mask, t)
    trans = frames.trans.clone().requires_grad_(True)
    out = losses.starmd_loss(diffuser, Rigid(frames.rots, trans + 0.01), targets, mask, chains)
    out["loss"].backward()
    assert trans.grad[:, 0].abs().max() == 0 and trans.grad[:, 1:].abs().max() > 0
    wrecked = frames.trans.clone()
    wrecked[:, 0] += 5.0
    base = losses.starmd_loss(diffuser, Rigid(frames.rots, frames.trans + 0.01), targets, mask, chains)["loss"]
    moved = losses.starmd_loss(diffuser, Rigid(frames.rots, wrecked + 0.01), targets, mask, chains)["loss"]
    assert float(moved) == pytest.approx(float(base), rel=1e-12)
    every = losses.LossConfig(first_frame_weight=1.0)
    assert float(losses.starmd_loss(diffuser, Rigid(frames.rots, wrecked + 0.01), targets, mask, chains, every)["loss"]) > float(base)
    with pytest.raises(ValueError, match="first_frame_weight"):
        losses.LossConfig(first_frame_weight=-1.0)


def test_chain_term_is_the_bonded_distance_error_in_angstrom_and_skips_breaks(window):
    frames, mask, chains = window
    true = Rigid(frames.rots[0], frames.trans[0])  # (3 frames, N)
    atoms_true = backbone_from_frames(true, chain_index=chains[0])
    K, N = true.trans.shape[:2]
    bonded = torch.ones(K, N - 1, dtype=torch.bool)
    # a rigid motion of the whole prediction changes no bonded distance
    q = random_rotations((), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    moved = Rigid(q @ true.rots, true.trans @ q.T + 0.7)
    zero = losses.chain_bond_loss(backbone_from_frames(moved, chain_index=chains[0]), atoms_true, bonded)
    assert (zero < 1e-12).all()
    # residues 10.. shifted 1 Å along the Cα(9)->Cα(10) bond: that Cα-Cα grows by exactly 1 Å and
    # C(9)-N(10) by the projection of the shift on it; every other bonded pair is unchanged
    u = true.trans[:, 10] - true.trans[:, 9]
    u = u / u.norm(dim=-1, keepdim=True)
    trans = true.trans.clone()
    trans[:, 10:] += 0.1 * u[:, None]
    pred = Rigid(true.rots, trans)
    atoms_pred = backbone_from_frames(pred, chain_index=chains[0])
    cn_true = (atoms_true[:, 10, 0] - atoms_true[:, 9, 2]).norm(dim=-1) * 10
    cn_pred = (atoms_pred[:, 10, 0] - atoms_pred[:, 9, 2]).norm(dim=-1) * 10
    expected = (1.0 + (cn_pred - cn_true) ** 2) / 2 / (N - 1)
    torch.testing.assert_close(losses.chain_bond_loss(atoms_pred, atoms_true, bonded), expected, rtol=1e-7, atol=1e-10)
    # the same pair across a chain break does not count
    bonded[:, 9] = False
    assert (losses.chain_bond_loss(atoms_pred, atoms_true, bonded) < 1e-12).all()


def test_chain_weight_adds_the_chain_term_with_its_own_weight(window):
    frames, mask, chains = window
    g = torch.Generator().manual_seed(5)
    pred = Rigid(frames.rots, frames.trans + 0.03 * torch.randn(frames.trans.shape, generator=g, dtype=torch.float64))
    small_t = torch.tensor([[0.02, 0.1, 0.25], [0.05, 0.15, 0.2]], dtype=torch.float64)
    targets = _targets(frames, mask, small_t)
    off = losses.starmd_loss(SE3Diffuser(), pred, targets, mask, chains)
    assert math.isnan(float(off["chain"]))  # off by default: the old objective, unchanged
    on = losses.starmd_loss(SE3Diffuser(), pred, targets, mask, chains, losses.LossConfig(chain_weight=2.0))
    assert float(on["chain"]) > 0
    assert float(on["loss"] - off["loss"]) == pytest.approx(2.0 * float(on["chain"]), rel=1e-9)


def _slice_targets(targets, rows, frames):
    """The DiffusionTargets of some rows and leading frames (a shorter window, unpadded)."""
    cut = lambda x: x[rows][:, :frames]  # noqa: E731
    rig = lambda r: Rigid(cut(r.rots), cut(r.trans))  # noqa: E731
    return type(targets)(rig(targets.x0), cut(targets.origins), cut(targets.t), rig(targets.noisy_shifted),
                         cut(targets.rot_score), cut(targets.trans_score))


def test_padded_frames_are_outside_the_loss_and_the_mean_is_over_real_frames(window):
    """Example 1 has 2 real frames and one padding frame: the loss is the frame-weighted mean of the
    full example 0 and example 1 cut to 2 frames, whatever is predicted at the padding."""
    frames, mask, chains = window
    diffuser = SE3Diffuser()
    t = torch.tensor([[0.05, 0.2, 0.6], [0.1, 0.15, 0.24]], dtype=torch.float64)
    targets = _targets(frames, mask, t)
    cfg = losses.LossConfig(fape_weight=0.5, chain_weight=2.0)
    trans = frames.trans + 0.02 * torch.randn(frames.trans.shape, generator=torch.Generator().manual_seed(3),
                                              dtype=torch.float64)
    wild = trans.clone()
    wild[1, 2] += 5.0  # the padding frame's prediction
    fm = torch.tensor([[True, True, True], [True, True, False]])
    padded = losses.starmd_loss(diffuser, Rigid(frames.rots, wild), targets, mask, chains, cfg, frame_mask=fm)
    a = losses.starmd_loss(diffuser, Rigid(frames.rots[:1], trans[:1]), _slice_targets(targets, [0], 3), mask[:1],
                           chains[:1], cfg)
    b = losses.starmd_loss(diffuser, Rigid(frames.rots[1:, :2], trans[1:, :2]), _slice_targets(targets, [1], 2),
                           mask[1:], chains[1:], cfg)
    # first_frame_weight 0: example 0 trains frames 1 and 2, example 1 frame 1 only
    assert float(padded["loss"]) == pytest.approx((2 * float(a["loss"]) + float(b["loss"])) / 3, rel=1e-12)
    assert float(padded["trans"]) == pytest.approx((2 * float(a["trans"]) + float(b["trans"])) / 3, rel=1e-12)
    # without the mask the wild padding frame would dominate
    unmasked = losses.starmd_loss(diffuser, Rigid(frames.rots, wild), targets, mask, chains, cfg)
    assert float(unmasked["loss"]) > 10 * float(padded["loss"])
    # an all-True mask is the unmasked loss exactly
    full = torch.ones(2, 3, dtype=torch.bool)
    same = losses.starmd_loss(diffuser, Rigid(frames.rots, trans), targets, mask, chains, cfg, frame_mask=full)
    assert float(same["loss"]) == float(losses.starmd_loss(diffuser, Rigid(frames.rots, trans), targets, mask, chains,
                                                          cfg)["loss"])
