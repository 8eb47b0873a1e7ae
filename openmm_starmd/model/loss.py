"""Denoising losses on predicted clean frames.

Which part of STAR-MD: the training objective of the x0-predicting SE(3) diffusion model, applied
to the noisy slots of a block-causal training pass (:func:`openmm_starmd.model.sequence.training_sequence`).

Choices where the paper is silent (FrameDiff's, adapted):

- ``trans_x0``: mean squared error of the predicted Cα positions, nm², summed over x, y, z.
  Translation-invariant, so it needs no diffusion origin.
- ``rot_x0``: chordal distance ||R_pred - R_true||_F² = 4 (1 - cos θ) of the rotations.
- ``rot_score``: FrameDiff's rotation score matching: the body-frame IGSO(3) score implied by the
  predicted x0 against the true conditional score, each divided by the diffuser's
  ``rot_score_scaling(t)`` so every t contributes O(1).

Means run over valid residues and all frames. The total is a weighted sum; the weights are the
caller's (training config), defaults below.
"""
from __future__ import annotations

import torch

from ..geometry.rigid import Rigid
from .sequence import DiffusionTargets, shift_frames

__all__ = ["frame_losses", "denoising_loss"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(x.dtype).expand(x.shape)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def frame_losses(pred: Rigid, target: Rigid, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Translation MSE (nm²) and chordal rotation error of predicted frames.

    Parameters
    ----------
    pred, target : Rigid, batch shape (B, L, N)
    mask : torch.Tensor, shape (B, N), bool

    Returns
    -------
    trans_mse, rot_chordal : torch.Tensor, scalars
    """
    m = mask[:, None]
    trans = ((pred.trans - target.trans) ** 2).sum(-1)
    rot = ((pred.rots - target.rots) ** 2).sum((-1, -2))
    return _masked_mean(trans, m), _masked_mean(rot, m)


def denoising_loss(
    diffuser,
    pred_x0: Rigid,
    targets: DiffusionTargets,
    mask: torch.Tensor,
    trans_weight: float = 1.0,
    rot_weight: float = 1.0,
    rot_score_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weighted denoising loss of the noisy slots of a training pass.

    Parameters
    ----------
    diffuser : SE3Diffuser
    pred_x0 : Rigid, batch shape (B, L, N), nm
        Network output at the noisy slots (slots L..2L-1 of the training sequence).
    targets : DiffusionTargets
    mask : torch.Tensor, shape (B, N), bool
    trans_weight, rot_weight, rot_score_weight : float
        Weights of ``trans_x0``, ``rot_x0`` and ``rot_score``.

    Returns
    -------
    dict with "loss" and the unweighted terms "trans_x0" (nm²), "rot_x0", "rot_score".
    """
    trans_x0, rot_x0 = frame_losses(pred_x0, targets.x0, mask)
    t = targets.t[..., None]
    pred_shifted = shift_frames(pred_x0, targets.origins)
    rot_score, _ = diffuser.scores_from_x0(targets.noisy_shifted, pred_shifted, t)
    scale = diffuser.rot_score_scaling(t).to(rot_score.dtype)[..., None]
    rot_sm = _masked_mean((((rot_score - targets.rot_score) / scale) ** 2).sum(-1), mask[:, None])
    loss = trans_weight * trans_x0 + rot_weight * rot_x0 + rot_score_weight * rot_sm
    return {"loss": loss, "trans_x0": trans_x0, "rot_x0": rot_x0, "rot_score": rot_sm}
