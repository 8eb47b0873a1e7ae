"""The STAR-MD training loss: FrameDiff's SE(3) denoising loss per frame plus auxiliary backbone losses.

Which part of STAR-MD: the objective of block-causal teacher forcing. One pass over
[clean 1..L, noisy 1..L] predicts the clean frame x0 of every noisy slot; each of the L noisy
frames has its own diffusion time t ~ U[t_min, 1], and this module turns the L predictions into
one scalar. The paper trains "with FrameDiff's losses"; it does not restate the constants, so we
take FrameDiff's published defaults (``config/base.yaml`` of jasonkyuyim/se3_diffusion) and write
them down here:

=================  ======  =====================================================================
term               weight  definition (per frame, mean over valid residues)
=================  ======  =====================================================================
``trans``          1.0     t <= ``trans_x0_threshold``: |x0_pred - x0|^2 of the Cα, nm^2 (the
                           x0 loss); t above it: |s_pred - s|^2 / trans_score_scaling(t)^2 (the
                           score loss). FrameDiff's threshold is 1.0, i.e. always the x0 loss,
                           because the translation score loss explodes as t -> 0.
``rot``            0.5     |s_pred - s|^2 / rot_score_scaling(t)^2 of the body-frame IGSO(3)
                           score implied by the predicted rotation (FrameDiff's rotation loss).
``bb_atom``        0.25    mean |a_pred - a|^2 over the ideal N, CA, C, O of every residue
                           (:func:`openmm_starmd.geometry.frames.backbone_from_frames`), in Å^2,
                           only for frames with t <= ``aux_t_filter`` = 0.25.
``dist_mat``       0.25    mean (d_pred - d)^2 over pairs of those atoms closer than 0.6 nm in
                           the target, Å^2, same t filter.
``chain``          0       optional: mean (d_pred - d)^2 of the bonded-neighbour distances the
                           validity metrics judge, Cα(i)-Cα(i+1) and C(i)-N(i+1) of consecutive
                           residues of one chain, Å^2, same t filter, *not* scaled by the 0.25.
                           In the distance map these two pairs are 2 of ~40 partners per atom.
``fape``           0       optional backbone FAPE on the Cα (AlphaFold), clamp 1 nm, length
                           scale 1 nm (unitless), same t filter, *not* scaled by the 0.25 (as
                           FrameDiff's); 0.5 enables it. Off by default: on the short 1ENH MD
                           it changed no validation metric (training/TRAINING.md) and costs
                           an N x N pass per frame.
=================  ======  =====================================================================

Choices where FrameDiff and the paper leave room:

- Units. FrameDiff measures translations in nm (Å times its ``coordinate_scaling`` 0.1) but its
  auxiliary losses in Å^2; we keep exactly that split so the weight 0.25 means what it meant
  there (in nm^2 the auxiliary terms would be 100x weaker and do nothing).
- Targets of the auxiliary losses are the *ideal* backbone rebuilt from the true frames, with
  the carbonyl O placed from the next residue's frame, i.e. the same construction as the
  prediction; the loss can then reach zero (the network predicts no psi). A missing residue
  counts as a chain end for its predecessor's O, so its placeholder frame never leaks in.
- Aggregation: every term is a masked mean over residues within one frame; frames are averaged
  over batch and window, so long windows and large batches are not weighted differently. The
  auxiliary terms of frames with t above the filter count as 0 in that average (FrameDiff's
  per-example behaviour).

The per-term values returned are the unweighted means over the frames each applies to (NaN when
no frame of the batch qualifies), handy for logs; ``loss`` is the weighted objective. A
prediction with NaN/Inf anywhere gives a NaN loss (the trainer stops on it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from openmm_starmd.geometry.frames import backbone_from_frames
from openmm_starmd.geometry.rigid import Rigid, invert_apply
from openmm_starmd.model.sequence import DiffusionTargets, shift_frames

__all__ = ["LossConfig", "LOSS_TERMS", "starmd_loss", "backbone_atom_loss", "distance_map_loss", "chain_bond_loss",
           "backbone_fape"]

#: Names of the per-term values :func:`starmd_loss` returns besides ``loss``.
LOSS_TERMS = ("trans", "rot", "bb_atom", "dist_mat", "chain", "fape")

_ANGSTROM_PER_NM = 10.0


@dataclass
class LossConfig:
    """Weights and thresholds of :func:`starmd_loss` (defaults: FrameDiff's, see the module docstring).

    Attributes
    ----------
    trans_weight, rot_weight : float
        Weights of the translation and rotation denoising losses.
    trans_x0_threshold : float
        Frames with t at or below it get the translation x0 loss, others the score loss.
    aux_weight : float
        Weight of the auxiliary backbone atom and distance-map losses.
    aux_t_filter : float
        Auxiliary losses apply only to frames with t <= this.
    bb_atom_weight, dist_mat_weight : float
        Relative weights inside the auxiliary group (0 switches a term off and skips its cost).
    chain_weight : float
        Weight of the bonded-neighbour distance loss (:func:`chain_bond_loss`; not multiplied by
        ``aux_weight``; 0, the default, skips it).
    fape_weight : float
        Weight of the backbone FAPE (not multiplied by ``aux_weight``; 0 skips it).
    dist_cutoff_nm : float
        Distance-map pairs farther apart than this in the target are ignored, nm.
    fape_clamp_nm : float
        FAPE clamp and length scale, nm.
    first_frame_weight : float
        Weight of frame 0 of each window relative to the others. Frame 0 has no history in the
        block-causal pass: predicting it is unconditional structure generation, which a rollout
        never does (it always starts from at least one given frame). With the default
        ``x0_anchor="previous"`` it is also the one frame anchored on its own noisy input, whose
        large high-t corrections then dominate the gradient and teach the shared head to move
        history-anchored frames far (measured: chains blew up to a mean Cα–Cα of 6–12 Å within
        10 frames). Default 0; 1 trains every frame equally, as the paper's block-causal pass.
    """

    trans_weight: float = 1.0
    rot_weight: float = 0.5
    trans_x0_threshold: float = 1.0
    aux_weight: float = 0.25
    aux_t_filter: float = 0.25
    bb_atom_weight: float = 1.0
    dist_mat_weight: float = 1.0
    chain_weight: float = 0.0
    fape_weight: float = 0.0
    dist_cutoff_nm: float = 0.6
    fape_clamp_nm: float = 1.0
    first_frame_weight: float = 0.0

    def __post_init__(self):
        for name in ("trans_weight", "rot_weight", "aux_weight", "bb_atom_weight", "dist_mat_weight", "chain_weight",
                     "fape_weight", "first_frame_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be >= 0; use 0 to switch a term off.")
        if not (self.dist_cutoff_nm > 0 and self.fape_clamp_nm > 0):
            raise ValueError(
                f"LossConfig.dist_cutoff_nm={self.dist_cutoff_nm} and fape_clamp_nm={self.fape_clamp_nm} must be "
                "positive lengths in nm."
            )


def _residue_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis (residues) where ``mask``; x, mask (..., N) -> (...)."""
    w = mask.to(x.dtype)
    return (x * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def _frames_mean(per_frame: torch.Tensor, applies: torch.Tensor) -> torch.Tensor:
    """Mean of per-frame values over the frames where ``applies`` (NaN if none), detached for logs."""
    if not bool(applies.any()):
        return per_frame.new_tensor(float("nan"))
    return per_frame.detach()[applies].mean()


def backbone_atom_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared backbone-atom error per frame.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (K, N, A, 3), nm
        A backbone atoms per residue.
    mask : torch.Tensor, shape (K, N), bool

    Returns
    -------
    torch.Tensor, shape (K,), Å^2
        Mean over valid residues and their atoms of the squared distance.
    """
    sq = ((pred - target) * _ANGSTROM_PER_NM).pow(2).sum(-1).mean(-1)
    return _residue_mean(sq, mask)


def distance_map_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cutoff_nm: float) -> torch.Tensor:
    """Squared error of the local distance map of backbone atoms per frame.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (K, N, A, 3), nm
    mask : torch.Tensor, shape (K, N), bool
    cutoff_nm : float
        Only pairs closer than this in ``target`` count (FrameDiff: 6 Å); self-pairs never count.

    Returns
    -------
    torch.Tensor, shape (K,), Å^2
    """
    K, N, A, _ = pred.shape
    p = pred.reshape(K, N * A, 3) * _ANGSTROM_PER_NM
    q = target.reshape(K, N * A, 3) * _ANGSTROM_PER_NM
    # sqrt(. + eps): the gradient of a bare norm is 0/0 for coincident points
    dp = ((p[:, :, None] - p[:, None]).pow(2).sum(-1) + 1e-8).sqrt()
    dq = ((q[:, :, None] - q[:, None]).pow(2).sum(-1) + 1e-8).sqrt()
    valid = mask[:, :, None].expand(K, N, A).reshape(K, N * A)
    pairs = valid[:, :, None] & valid[:, None] & (dq < cutoff_nm * _ANGSTROM_PER_NM)
    pairs &= ~torch.eye(N * A, dtype=torch.bool, device=pred.device)
    w = pairs.to(p.dtype)
    return ((dp - dq).pow(2) * w).sum((-1, -2)) / w.sum((-1, -2)).clamp_min(1.0)


def chain_bond_loss(pred: torch.Tensor, target: torch.Tensor, bonded: torch.Tensor) -> torch.Tensor:
    """Squared error of the Cα(i)-Cα(i+1) and C(i)-N(i+1) distances per frame.

    Parameters
    ----------
    pred, target : torch.Tensor, shape (K, N, A, 3), nm
        Backbone atoms (N, CA, C, ...) per residue.
    bonded : torch.Tensor, shape (K, N - 1), bool
        Whether residues i and i + 1 are both valid and in one chain.

    Returns
    -------
    torch.Tensor, shape (K,), Å^2
        Mean over bonded pairs of the two squared distance errors (0 for a frame without any).
    """
    def pair_lengths(x):
        ca = (x[:, 1:, 1] - x[:, :-1, 1]).pow(2).sum(-1)
        cn = (x[:, 1:, 0] - x[:, :-1, 2]).pow(2).sum(-1)
        return ((torch.stack([ca, cn], -1) + 1e-10).sqrt()) * _ANGSTROM_PER_NM  # (K, N-1, 2), Å

    err = (pair_lengths(pred) - pair_lengths(target)).pow(2).mean(-1)
    return _residue_mean(err, bonded)


def backbone_fape(pred: Rigid, target: Rigid, mask: torch.Tensor, clamp_nm: float) -> torch.Tensor:
    """Frame-aligned point error of the Cα (AlphaFold's FAPE on backbone frames) per frame.

    Parameters
    ----------
    pred, target : Rigid, batch shape (K, N), nm
    mask : torch.Tensor, shape (K, N), bool
    clamp_nm : float
        Errors are clamped at, and divided by, this length.

    Returns
    -------
    torch.Tensor, shape (K,), unitless
    """
    # Cα j seen from frame i: (K, N_i, N_j, 3)
    local_p = invert_apply(pred, pred.trans[:, None])
    local_q = invert_apply(target, target.trans[:, None])
    err = ((local_p - local_q).pow(2).sum(-1) + 1e-6 * clamp_nm**2).sqrt().clamp(max=clamp_nm) / clamp_nm
    pairs = (mask[:, :, None] & mask[:, None]).to(err.dtype)
    return (err * pairs).sum((-1, -2)) / pairs.sum((-1, -2)).clamp_min(1.0)


def starmd_loss(
    diffuser,
    pred_x0: Rigid,
    targets: DiffusionTargets,
    mask: torch.Tensor,
    chain_index: torch.Tensor,
    config: LossConfig | None = None,
    frame_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The training loss of one block-causal pass.

    Parameters
    ----------
    diffuser : SE3Diffuser
    pred_x0 : Rigid, batch shape (B, L, N), nm, global coordinates
        Network output at the noisy slots (slots L..2L-1 of the training sequence).
    targets : DiffusionTargets
        From :func:`openmm_starmd.model.sequence.training_sequence`; ``targets.t`` is (B, L).
    mask : torch.Tensor, shape (B, N), bool
        Valid residues.
    chain_index : torch.Tensor, shape (B, N), long
        Chains, so no peptide bond is assumed across a chain break when placing O.
    config : LossConfig, optional
    frame_mask : torch.Tensor, shape (B, L), bool, optional
        False for padding frames of windows shorter than L (:class:`training/data.py
        WindowSampler`): they add nothing to the loss or the logged terms. None: all frames real.

    Returns
    -------
    dict
        ``loss`` (scalar, differentiable), ``frame_weight`` (the loss's denominator: the summed
        weights of the trained, unpadded frames; to combine batches or processes exactly) and the
        unweighted terms of :data:`LOSS_TERMS` (detached scalars; NaN for a term no frame of the
        batch qualified for).
    """
    cfg = config if config is not None else LossConfig()
    if not (torch.isfinite(pred_x0.trans).all() and torch.isfinite(pred_x0.rots).all()):
        # a diverged network: report NaN (the trainer stops on it) instead of feeding NaN rotations
        # to the IGSO(3) score tables
        nan = pred_x0.trans.new_tensor(float("nan"))
        return {"loss": nan, "frame_weight": nan, **{k: nan for k in LOSS_TERMS}}
    t = targets.t
    B, L = t.shape
    m = mask[:, None].expand(B, L, -1)
    dtype = pred_x0.trans.dtype
    t_col = t.to(dtype)[..., None]  # (B, L, 1) broadcasts over residues

    pred_shifted = shift_frames(pred_x0, targets.origins)
    rot_score, trans_score = diffuser.scores_from_x0(targets.noisy_shifted, pred_shifted, t_col)

    rot_scale = diffuser.rot_score_scaling(t_col).to(dtype)[..., None]
    rot = _residue_mean(((rot_score - targets.rot_score) / rot_scale).pow(2).sum(-1), m)

    use_x0 = t <= cfg.trans_x0_threshold
    trans_x0 = _residue_mean((pred_x0.trans - targets.x0.trans).pow(2).sum(-1), m)
    if bool(use_x0.all()):
        trans = trans_x0
    else:
        trans_scale = diffuser.trans_score_scaling(t_col).to(dtype)[..., None]
        trans_sm = _residue_mean(((trans_score - targets.trans_score) / trans_scale).pow(2).sum(-1), m)
        trans = torch.where(use_x0, trans_x0, trans_sm)

    per_frame = cfg.trans_weight * trans + cfg.rot_weight * rot
    weight = torch.ones(L, dtype=dtype, device=per_frame.device)
    weight[0] = cfg.first_frame_weight
    if not bool(weight.sum() > 0):
        raise ValueError("LossConfig.first_frame_weight=0 with windows of 1 frame leaves nothing to train; "
                         "use windows of at least 2 frames.")
    trained = (weight > 0)[None, :].expand(B, L)  # the logged terms are means over these frames
    if frame_mask is not None:
        trained = trained & frame_mask.to(device=trained.device, dtype=torch.bool)
        weight = weight[None, :] * frame_mask.to(device=weight.device, dtype=dtype)
    else:
        weight = weight[None, :].expand(B, L)
    terms = {"trans": _frames_mean(trans, trained), "rot": _frames_mean(rot, trained)}

    aux = (t <= cfg.aux_t_filter) & trained
    nan = pred_x0.trans.new_tensor(float("nan"))
    terms.update(bb_atom=nan, dist_mat=nan, chain=nan, fape=nan)
    want = {k: getattr(cfg, f"{k}_weight") > 0 and cfg.aux_weight > 0 for k in ("bb_atom", "dist_mat")}
    want["fape"] = cfg.fape_weight > 0
    want["chain"] = cfg.chain_weight > 0
    if any(want.values()) and bool(aux.any()):
        # only the selected frames: the distance map is (4N)^2 per frame
        sel_pred = Rigid(pred_x0.rots[aux], pred_x0.trans[aux])
        sel_true = Rigid(targets.x0.rots[aux], targets.x0.trans[aux])
        sel_mask = m[aux]
        # a missing residue is no bonded neighbour: its placeholder frame must not place the O before it
        N = mask.shape[-1]
        own_chain = -1 - torch.arange(N, device=mask.device)
        chains = torch.where(mask, chain_index, own_chain)[:, None].expand(B, L, -1)[aux]
        aux_loss = torch.zeros(sel_mask.shape[0], dtype=dtype, device=sel_mask.device)  # weighted, per frame
        if want["bb_atom"] or want["dist_mat"] or want["chain"]:
            atoms_pred = backbone_from_frames(sel_pred, chain_index=chains)
            with torch.no_grad():
                atoms_true = backbone_from_frames(sel_true, chain_index=chains)
            if want["bb_atom"]:
                bb = backbone_atom_loss(atoms_pred, atoms_true, sel_mask)
                aux_loss = aux_loss + cfg.aux_weight * cfg.bb_atom_weight * bb
                terms["bb_atom"] = bb.detach().mean()
            if want["dist_mat"]:
                dm = distance_map_loss(atoms_pred, atoms_true, sel_mask, cfg.dist_cutoff_nm)
                aux_loss = aux_loss + cfg.aux_weight * cfg.dist_mat_weight * dm
                terms["dist_mat"] = dm.detach().mean()
            if want["chain"]:
                bonded = sel_mask[:, 1:] & sel_mask[:, :-1] & (chains[:, 1:] == chains[:, :-1])
                ch = chain_bond_loss(atoms_pred, atoms_true, bonded)
                aux_loss = aux_loss + cfg.chain_weight * ch
                terms["chain"] = ch.detach().mean()
        if want["fape"]:
            fape = backbone_fape(sel_pred, sel_true, sel_mask, cfg.fape_clamp_nm)
            aux_loss = aux_loss + cfg.fape_weight * fape
            terms["fape"] = fape.detach().mean()
        aux_full = per_frame.new_zeros(B, L)
        aux_full[aux] = aux_loss
        per_frame = per_frame + aux_full
    total = weight.sum()
    return {"loss": (per_frame * weight).sum() / total.clamp_min(torch.finfo(dtype).tiny),
            "frame_weight": total.detach(), **terms}
