"""Tokens, the [clean, noisy] training sequence, and where each frame is diffused.

Which part of STAR-MD: the token layout (one token per residue and frame; a training window of L
frames is the sequence [clean frames 1..L, noisy frames 1..L], i.e. 2 L N tokens, trained in one
block-causal pass) and contextual noise on the clean history.

The coordinate convention (shared by the sampler and training, defined only here):

- The network is SE(3)-equivariant and translation-invariant, so it always sees *global*
  coordinates (nm) and never needs to know an origin.
- The diffusion steps, however, work in shifted coordinates, because the VP prior on translations
  is centred at the origin while proteins sit anywhere. Noisy frame l is diffused relative to the
  Cα centroid of the clean frame l - 1 (the previous frame's un-noised structure); the first frame of
  a window, which has no predecessor in it, relative to its own Cα centroid
  (:func:`noisy_frame_origins`). At inference the "previous clean frame" is the last frame added
  or generated, before contextual noise.
- Contextual noise on a clean history frame is applied about that frame's *own* Cα centroid
  (:func:`apply_contextual_noise`), so it perturbs shape and orientation but never drags the
  protein towards the coordinate origin.

Cα centroids are means over valid residues of the frame translations (the frame origin is Cα).
Missing residues carry finite placeholder frames; they never act as keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.rigid import Rigid

__all__ = [
    "AA_ORDER",
    "UNKNOWN_AATYPE",
    "N_AATYPES",
    "ResidueFeatures",
    "TokenSequence",
    "DiffusionTargets",
    "ca_centroid",
    "shift_frames",
    "cat_frames",
    "noisy_frame_origins",
    "apply_contextual_noise",
    "training_sequence",
]

#: AlphaFold residue order; index 20 is "unknown".
AA_ORDER = "ARNDCQEGHILKMFPSTWYV"
UNKNOWN_AATYPE = 20
N_AATYPES = 21


def _as_long(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, device=device)
    if t.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {t.dtype}; pass integer indices.")
    return t.long()


@dataclass
class ResidueFeatures:
    """Per-residue inputs shared by every frame, batched over replicas.

    Attributes
    ----------
    aatype : torch.Tensor, shape (B, N), long
        Residue types 0..20 in :data:`AA_ORDER`, 20 = unknown.
    residue_index : torch.Tensor, shape (B, N), long
        Residue numbers (gaps allowed; only differences matter).
    chain_index : torch.Tensor, shape (B, N), long
        0-based chain of every residue.
    mask : torch.Tensor, shape (B, N), bool
        False for missing residues.
    """

    aatype: torch.Tensor
    residue_index: torch.Tensor
    chain_index: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(cls, aatype, residue_index, chain_index, mask=None, batch: int | None = None, device=None):
        """Validate and batch per-residue arrays.

        Parameters
        ----------
        aatype, residue_index, chain_index : array-like, shape (N,) or (B, N), integer
        mask : array-like, shape (N,) or (B, N), bool, optional
            Defaults to all residues present.
        batch : int, optional
            Broadcast (N,) inputs to this many replicas.
        device : torch.device or str, optional
        """
        aa = _as_long(aatype, "aatype", device)
        ri = _as_long(residue_index, "residue_index", device)
        ci = _as_long(chain_index, "chain_index", device)
        m = torch.ones_like(aa, dtype=torch.bool) if mask is None else torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, device=device).bool()
        shapes = {"aatype": aa.shape, "residue_index": ri.shape, "chain_index": ci.shape, "mask": m.shape}
        if len(set(shapes.values())) != 1 or aa.dim() not in (1, 2):
            raise ValueError(f"per-residue inputs must share one shape (N,) or (B, N); got {shapes}.")
        if aa.dim() == 1:
            b = 1 if batch is None else batch
            aa, ri, ci, m = (t[None].expand(b, -1) for t in (aa, ri, ci, m))
        elif batch is not None and aa.shape[0] != batch:
            raise ValueError(f"per-residue inputs have batch {aa.shape[0]} but {batch} replicas were requested; pass (N,) arrays or match B.")
        # own copies: callers' arrays must not alias (and be mutated through) the features
        aa, ri, ci, m = (t.clone() for t in (aa, ri, ci, m))
        if aa.numel() and (aa.min() < 0 or aa.max() >= N_AATYPES):
            raise ValueError(f"aatype values must be 0..{N_AATYPES - 1} (AlphaFold order, 20 = unknown); got range {int(aa.min())}..{int(aa.max())}.")
        if ci.numel() and ci.min() < 0:
            raise ValueError("chain_index has negative values; number chains 0, 1, 2, ...")
        if not bool(m.any(-1).all()):
            raise ValueError("mask has no valid residue in some replica; at least one residue must be present.")
        return cls(aa, ri, ci, m)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, N)."""
        return tuple(self.aatype.shape)


@dataclass
class TokenSequence:
    """A sequence of token slots: every slot is one frame of one kind (clean or noisy).

    Attributes
    ----------
    frames : Rigid, batch shape (B, S, N)
        Residue frames, global coordinates, nm.
    frame_index : torch.Tensor, shape (S,), long
        Frame number of every slot (for RoPE and the block-causal mask).
    noisy : torch.Tensor, shape (S,), bool
        True for noisy slots.
    noise_level : torch.Tensor, shape (B, S)
        t for noisy slots, τ for clean slots.
    dt_ns : torch.Tensor, shape (B,), ns
    anchor_frames : Rigid or None, batch shape (B, S, N)
        The slots' frames before contextual noise (clean slots: the MD frames), the x0 anchors
        of ``ModelConfig.x0_anchor = "previous"``; None means ``frames``.
    """

    frames: Rigid
    frame_index: torch.Tensor
    noisy: torch.Tensor
    noise_level: torch.Tensor
    dt_ns: torch.Tensor
    anchor_frames: Rigid | None = None


@dataclass
class DiffusionTargets:
    """What a training loss needs besides the network output.

    Attributes
    ----------
    x0 : Rigid, (B, L, N)
        Clean frames, global coordinates, nm.
    origins : torch.Tensor, shape (B, L, 3), nm
        Diffusion origin of every noisy frame (:func:`noisy_frame_origins`).
    t : torch.Tensor, shape (B, L)
        Diffusion time of every noisy frame.
    noisy_shifted : Rigid, (B, L, N)
        Noisy frames in diffusion coordinates (global minus origin).
    rot_score, trans_score : torch.Tensor, shapes (B, L, N, 3)
        True conditional scores from ``SE3Diffuser.forward_marginal``.
    """

    x0: Rigid
    origins: torch.Tensor
    t: torch.Tensor
    noisy_shifted: Rigid
    rot_score: torch.Tensor
    trans_score: torch.Tensor


def ca_centroid(frames: Rigid, mask: torch.Tensor) -> torch.Tensor:
    """Mean Cα position (frame origin) over valid residues.

    Parameters
    ----------
    frames : Rigid, batch shape (..., N)
    mask : torch.Tensor, shape broadcastable to (..., N), bool

    Returns
    -------
    torch.Tensor, shape (..., 3), nm
    """
    m = mask.expand(frames.trans.shape[:-1])[..., None]
    # where(), not a product: missing residues may hold NaN, and NaN * 0 is NaN
    total = torch.where(m, frames.trans, 0.0).sum(-2)
    return total / m.sum(-2).clamp_min(1).to(frames.trans.dtype)


def shift_frames(frames: Rigid, offset: torch.Tensor) -> Rigid:
    """Express frames relative to ``offset``: trans - offset. frames (..., N), offset (..., 3)."""
    return Rigid(frames.rots, frames.trans - offset[..., None, :])


def cat_frames(parts, dim: int) -> Rigid:
    """Concatenate Rigids along a batch dimension ``dim`` (counted over batch dims, >= 0)."""
    return Rigid(torch.cat([p.rots for p in parts], dim), torch.cat([p.trans for p in parts], dim))


def noisy_frame_origins(clean: Rigid, mask: torch.Tensor) -> torch.Tensor:
    """Diffusion origin of each noisy frame in a window: the Cα centroid of the previous clean frame.

    Parameters
    ----------
    clean : Rigid, batch shape (B, L, N)
        Clean (un-noised) frames, nm.
    mask : torch.Tensor, shape (B, N), bool

    Returns
    -------
    torch.Tensor, shape (B, L, 3), nm
        Row 0 is frame 0's own centroid, row l > 0 is frame l - 1's centroid.
    """
    c = ca_centroid(clean, mask[:, None])
    return torch.cat([c[:, :1], c[:, :-1]], dim=1)


def apply_contextual_noise(diffuser, frames: Rigid, tau: torch.Tensor, mask: torch.Tensor, generator=None) -> Rigid:
    """Perturb clean history frames with the diffuser's contextual noise at level τ.

    Parameters
    ----------
    diffuser : SE3Diffuser
        Provides ``contextual_noise(rigid0, tau, generator)``.
    frames : Rigid, batch shape (..., N), nm
    tau : torch.Tensor, shape (...)
        Noise level per frame; 0 leaves a frame unchanged.
    mask : torch.Tensor, shape broadcastable to (..., N), bool
    generator : torch.Generator, optional

    Returns
    -------
    Rigid, batch shape (..., N), nm
        Noised about each frame's own Cα centroid (see the module docstring).
    """
    c = ca_centroid(frames, mask)
    noised = diffuser.contextual_noise(shift_frames(frames, c), tau[..., None], generator=generator)
    return shift_frames(noised, -c)


def training_sequence(
    diffuser,
    clean: Rigid,
    mask: torch.Tensor,
    t: torch.Tensor,
    dt_ns: torch.Tensor,
    tau: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[TokenSequence, DiffusionTargets]:
    """Build the block-causal training sequence [clean 0..L-1, noisy 0..L-1] for a window.

    Parameters
    ----------
    diffuser : SE3Diffuser
    clean : Rigid, batch shape (B, L, N)
        A window of L consecutive MD frames, global coordinates, nm.
    mask : torch.Tensor, shape (B, N), bool
    t : torch.Tensor, shape (B, L)
        Diffusion time of each noisy frame, in (0, 1].
    dt_ns : torch.Tensor, shape (B,), ns
        Physical spacing of the window's frames.
    tau : torch.Tensor, shape (B, L), optional
        Context-noise level of each clean frame (STAR-MD draws τ ~ U[0, 0.1]); None for no
        contextual noise.
    generator : torch.Generator, optional

    Returns
    -------
    sequence : TokenSequence
        2 L slots; feed to ``StarMDNetwork.forward`` and read the noisy slots L..2L-1.
    targets : DiffusionTargets
    """
    B, L = clean.trans.shape[:2]
    origins = noisy_frame_origins(clean, mask)
    noisy_shifted, rot_score, trans_score = diffuser.forward_marginal(
        shift_frames(clean, origins), t[..., None], generator=generator
    )
    noisy = shift_frames(noisy_shifted, -origins)
    if tau is None:
        tau = torch.zeros_like(t)
        history = clean
    else:
        history = apply_contextual_noise(diffuser, clean, tau, mask[:, None], generator=generator)
    device = clean.trans.device
    frame_index = torch.arange(L, device=device).repeat(2)
    is_noisy = torch.arange(2 * L, device=device) >= L
    sequence = TokenSequence(
        frames=cat_frames([history, noisy], dim=1),
        frame_index=frame_index,
        noisy=is_noisy,
        noise_level=torch.cat([tau, t], dim=1),
        dt_ns=dt_ns,
        anchor_frames=cat_frames([clean, noisy], dim=1),
    )
    targets = DiffusionTargets(clean, origins, t, noisy_shifted, rot_score, trans_score)
    return sequence, targets
