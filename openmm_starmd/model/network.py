"""The STAR-MD denoising network: full block-causal forward and KV-cached rollout steps.

Which part of STAR-MD: the SE(3)-equivariant transformer over per-residue rigid frames that,
given clean history frames and one noisy frame per slot, predicts the clean frame x0.

- Token features: amino-acid embedding (21 types) + chain embedding (index mod ``max_chains``) +
  a projection of the slot's conditioning vector. Residue index and frame index enter only
  through the 2D RoPE; geometry only through the invariant point attention.
- Layers: :class:`openmm_starmd.model.adaln.AdaLNLayer` in the order of
  ``ModelConfig.layer_kinds()``.
- Output (noisy slots): an AdaLN-modulated linear head gives a rotation vector ω (rad) and a
  translation u (nm) in a base frame's local frame; x0 = T_base ∘ (exp(ω), u), which keeps the
  prediction SE(3)-equivariant. The base is ``ModelConfig.x0_anchor``'s: the noisy input
  (FrameDiff), the previous frame before contextual noise (or the mean of the last
  ``anchor_frames`` of them), or its posterior-mean blend with the noisy input
  (:mod:`openmm_starmd.model.anchor`). The head starts at zero, i.e. x0 = base at initialisation.
- We do not update frames between layers (no IPA-style backbone update): clean frames are pure
  conditioning, and keeping every layer's points on the input frames lets the KV cache store keys
  that depend on the inputs only. The network predicts x0 once, at the end.

Two ways to run it, equal up to rounding (tested):

- :meth:`StarMDNetwork.forward` runs a whole :class:`~openmm_starmd.model.sequence.TokenSequence`
  under the block-causal mask (training: [clean 1..L, noisy 1..L]).
- :meth:`start_rollout` / :meth:`append_clean` / :meth:`denoise` run one slot at a time against a
  :class:`~openmm_starmd.model.kv_cache.KVCache` (sampling).

dtype: the network computes in the dtype of its parameters (float32 or float64); inputs are cast.
Under ``torch.autocast`` (bf16 on CUDA) the linear layers run in low precision while the geometry
(points, the fused attention, the output frames) stays in the parameter dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..geometry.rigid import Rigid, compose
from ..geometry.so3 import exp_map
from ..diffusion.config import DiffusionConfig
from .adaln import AdaLNLayer, modulate
from .anchor import PosteriorAnchor, history_weights, mean_frames
from .attention import FullContext
from .conditioning import Conditioning
from .config import ModelConfig
from .kv_cache import CachedContext, KVCache
from .rope import rope_angles, rope_tables
from .sequence import N_AATYPES, ResidueFeatures, TokenSequence, ca_centroid

__all__ = ["StarMDNetwork", "Rollout"]


@dataclass
class Rollout:
    """Per-rollout state of the cached network: residues, Δt, the KV cache and constants.

    Attributes
    ----------
    residues : ResidueFeatures
    dt_ns : torch.Tensor, shape (B,), ns
    cache : KVCache
    origin : torch.Tensor or None, shape (B, 3), nm
        Attention origin (Cα centroid of the first appended frame), fixed for the rollout.
    token_base : torch.Tensor, shape (B, N, C)
        Residue and chain embeddings.
    residue_angles : torch.Tensor, shape (B, N, d/4), float64
        RoPE angles of the residue positions.
    anchor : Rigid or None, batch shape (B, N), nm
        The last appended clean frame before contextual noise: the x0 anchor of the next noisy
        frame when ``config.x0_anchor`` is "previous" or "posterior" (and its diffusion origin).
    anchors : list of Rigid, batch shape (B, N), nm
        The last ``config.anchor_frames`` of them, oldest first, whose mean is the anchor when
        ``anchor_frames`` > 1.
    """

    residues: ResidueFeatures
    dt_ns: torch.Tensor
    cache: KVCache
    origin: torch.Tensor | None
    token_base: torch.Tensor
    residue_angles: torch.Tensor
    anchor: Rigid | None = None
    anchors: list = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        """Index of the next frame, i.e. clean frames of the rollout so far."""
        return self.cache.n_frames


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class StarMDNetwork(nn.Module):
    """SE(3)-equivariant spatio-temporal denoiser over residue frames.

    Parameters
    ----------
    config : ModelConfig
    diffusion_config : DiffusionConfig, optional
        The diffusion schedule of the noisy inputs; used only by ``x0_anchor="posterior"``
        (default: ``DiffusionConfig()``; checkpoints pass the saved one).
    """

    def __init__(self, config: ModelConfig, diffusion_config: DiffusionConfig | None = None):
        super().__init__()
        self.config = config
        self.diffusion_config = diffusion_config if diffusion_config is not None else DiffusionConfig()
        self._posterior = (PosteriorAnchor(self.diffusion_config, config.anchor_prior_nm, config.anchor_prior_rad,
                                           config.anchor_prior_dt_exponent, config.anchor_prior_dt_ref_ns)
                           if config.x0_anchor == "posterior" else None)
        C = config.width
        self.aatype_embedding = nn.Embedding(N_AATYPES, C)
        self.chain_embedding = nn.Embedding(config.max_chains, C)
        self.conditioning = Conditioning(config)
        self.cond_to_token = nn.Linear(C, C)
        self.layers = nn.ModuleList(AdaLNLayer(config, kind) for kind in config.layer_kinds())
        self.final_norm = nn.LayerNorm(C, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, 6)
        for lin in (self.final_modulation[1], self.head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype, in which geometry is computed."""
        return self.head.weight.dtype

    def _prepare_frames(self, frames: Rigid, mask: torch.Tensor) -> Rigid:
        """Cast to the parameter dtype and replace missing residues by finite placeholders.

        A NaN in a masked key would still poison the softmax (0 * NaN), hence the placeholders:
        identity rotation at the mean valid Cα.
        """
        rots, trans = frames.rots.to(self.dtype), frames.trans.to(self.dtype)
        m = mask if trans.dim() == 3 else mask[:, None]  # (B, N) or (B, 1, N)
        if bool(m.all()):
            return Rigid(rots, trans)
        eye = torch.eye(3, dtype=rots.dtype, device=rots.device)
        centre = ca_centroid(Rigid(rots, trans), m)
        rots = torch.where(m[..., None, None], rots, eye)
        trans = torch.where(m[..., None], trans, centre[..., None, :])
        return Rigid(rots, trans)

    def _token_base(self, residues: ResidueFeatures) -> torch.Tensor:
        chain = residues.chain_index % self.config.max_chains
        return self.aatype_embedding(residues.aatype) + self.chain_embedding(chain)

    def _residue_angles(self, residues: ResidueFeatures) -> torch.Tensor:
        c = self.config
        positions = residues.residue_index + c.chain_offset * residues.chain_index
        return rope_angles(positions, c.head_dim // 4, c.rope_base_residue)

    def _frame_angles(self, frame_index: torch.Tensor) -> torch.Tensor:
        c = self.config
        return rope_angles(frame_index, c.head_dim // 4, c.rope_base_frame)

    def _trunk(self, x, cond, rots, trans, cos, sin, context) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, cond, rots, trans, cos, sin, context, i)
        return x

    @staticmethod
    def anchor_slots(frame_index: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Slot whose frame anchors each slot's x0 under ``x0_anchor="previous"``.

        Parameters
        ----------
        frame_index : torch.Tensor, shape (S,), long
        noisy : torch.Tensor, shape (S,), bool

        Returns
        -------
        torch.Tensor, shape (S,), long
            For a noisy slot of frame f, the clean slot of frame f - 1 when the sequence has
            one; otherwise (clean slots, noisy frames without a predecessor) the slot itself.
        """
        S = frame_index.shape[0]
        idx = torch.arange(S, device=frame_index.device)
        prev = noisy[:, None] & ~noisy[None, :] & (frame_index[None, :] == frame_index[:, None] - 1)
        has = prev.any(dim=1)
        return torch.where(has, prev.float().argmax(dim=1), idx)

    def _prior_scale(self, dt_ns) -> torch.Tensor | None:
        """Width factor of the posterior prior per batch element, (B, 1) float64, or None (fixed)."""
        if self.config.fixed_dt_ns is not None:
            dt_ns = torch.full_like(torch.as_tensor(dt_ns, dtype=torch.float64), self.config.fixed_dt_ns)
        scale = self._posterior.prior_scale(torch.as_tensor(dt_ns).reshape(-1))
        return None if scale is None else scale[:, None]

    def _head(self, x: torch.Tensor, cond: torch.Tensor, frames: Rigid, t: torch.Tensor | None = None,
              scaled: torch.Tensor | None = None, prior_scale: torch.Tensor | None = None) -> Rigid:
        """x0 = frames ∘ update; under the "posterior" anchor the update of the slots flagged in
        ``scaled`` (B, S) is in units of the posterior standard deviation at their time t (B, S)
        (prior widths times ``prior_scale``, (B, 1), when the prior follows Δt)."""
        shift, scale = self.final_modulation(cond)[:, :, None].chunk(2, dim=-1)
        out = self.head(modulate(self.final_norm(x), shift, scale))
        with _no_autocast(x.device):
            out = out.to(frames.rots.dtype)
            if self._posterior is not None and t is not None:
                k_t, k_r = (k.to(out.dtype) for k in self._posterior.output_scales(t, prior_scale))
                one = torch.ones_like(k_t)
                k_t, k_r = torch.where(scaled, k_t, one), torch.where(scaled, k_r, one)
                out = torch.cat([out[..., :3] * k_r[..., None, None], out[..., 3:] * k_t[..., None, None]], dim=-1)
            update = Rigid(exp_map(out[..., :3]), out[..., 3:])
            return compose(frames, update)

    @staticmethod
    def _check_finite(frames: Rigid, mask: torch.Tensor, what: str) -> None:
        m = mask if frames.trans.dim() == 3 else mask[:, None]
        ok = torch.isfinite(frames.trans).all(-1) & torch.isfinite(frames.rots).flatten(-2).all(-1)
        if not bool((ok | ~m).all()):
            raise ValueError(f"{what} contain NaN or Inf at valid residues; pass finite frames (nm).")

    # ------------------------------------------------------------------ full forward
    def forward(
        self,
        residues: ResidueFeatures,
        sequence: TokenSequence,
        window: int | None = None,
        origin: torch.Tensor | None = None,
    ) -> Rigid:
        """Predict x0 for every slot of a sequence under the block-causal mask.

        Parameters
        ----------
        residues : ResidueFeatures, (B, N)
        sequence : TokenSequence, S slots
        window : int, optional
            Sliding window in frames (None: unbounded history).
        origin : torch.Tensor, shape (B, 3), nm, optional
            Attention origin; defaults to the Cα centroid of slot 0. Only affects rounding.

        Returns
        -------
        Rigid, batch shape (B, S, N), nm
            Predicted clean frames; meaningful for noisy slots (clean slots get an untrained
            output of the same head).
        """
        mask = residues.mask
        self._check_finite(sequence.frames, mask, "sequence.frames")
        frames = self._prepare_frames(sequence.frames, mask)
        if origin is None:
            origin = ca_centroid(Rigid(frames.rots[:, 0], frames.trans[:, 0]), mask)
        trans = frames.trans - origin.to(self.dtype)[:, None, None]
        cond = self.conditioning(sequence.noise_level, sequence.noisy, sequence.dt_ns)
        x = self._token_base(residues)[:, None] + self.cond_to_token(cond)[:, :, None]
        cos, sin = rope_tables(self._residue_angles(residues), self._frame_angles(sequence.frame_index), self.dtype)
        context = FullContext(sequence.frame_index, sequence.noisy, mask, window)
        x = self._trunk(x, cond, frames.rots, trans, cos, sin, context)
        if self.config.x0_anchor in ("previous", "posterior"):
            slots = self.anchor_slots(sequence.frame_index, sequence.noisy)
            own = frames
            if sequence.anchor_frames is not None:
                self._check_finite(sequence.anchor_frames, mask, "sequence.anchor_frames")
                anchors = self._prepare_frames(sequence.anchor_frames, mask)
                # clean slots anchor with their un-noised frames; a noisy slot without a
                # predecessor keeps its own (noisy) input as the anchor
                noisy = sequence.noisy
                rots = torch.where(noisy[:, None, None, None], frames.rots, anchors.rots)
                trans = torch.where(noisy[:, None, None], frames.trans, anchors.trans)
                frames = Rigid(rots, trans)
            previous = Rigid(frames.rots[:, slots], frames.trans[:, slots])
            if self.config.anchor_frames > 1:
                weights = history_weights(sequence.frame_index, sequence.noisy, self.config.anchor_frames)
                with _no_autocast(frames.trans.device):  # geometry stays in the parameter dtype
                    frames = mean_frames(frames.rots, frames.trans, weights.to(frames.trans.device))
            else:
                frames = previous
            if self._posterior is not None:
                # noisy slots with a predecessor blend it with their own input; the rest keep it
                blend = sequence.noisy & (slots != torch.arange(slots.shape[0], device=slots.device))
                origin_nm = ca_centroid(previous, mask[:, None])
                scale = self._prior_scale(sequence.dt_ns)
                base = self._posterior.base(frames, own, origin_nm, sequence.noise_level, scale)
                pick = blend[None, :, None]
                frames = Rigid(torch.where(pick[..., None, None], base.rots, frames.rots),
                               torch.where(pick[..., None], base.trans, frames.trans))
                return self._head(x, cond, frames, sequence.noise_level, blend[None, :], scale)
        return self._head(x, cond, frames)

    # ------------------------------------------------------------------ cached rollout
    def start_rollout(
        self,
        residues: ResidueFeatures,
        dt_ns,
        mode: str = "window",
        window: int | None = None,
        origin: torch.Tensor | None = None,
        start_frame: int = 0,
    ) -> Rollout:
        """Empty rollout state with a KV cache.

        Parameters
        ----------
        residues : ResidueFeatures, (B, N)
        dt_ns : float or torch.Tensor of shape (B,), ns
        mode : {"window", "full"}
            Cache mode, see :mod:`openmm_starmd.model.kv_cache`.
        window : int, optional
            Sliding window in frames for ``mode="window"``; defaults to ``config.context_frames``.
        origin : torch.Tensor, shape (B, 3), nm, optional
            Attention origin; defaults to the Cα centroid of the first appended frame.
        start_frame : int
            Frame index (for RoPE and the window) of the first frame to be appended.
        """
        B, N = residues.shape
        device = residues.aatype.device
        dt = torch.as_tensor(dt_ns, dtype=torch.float64, device=device).reshape(-1).expand(B).clone()
        first = self.layers[0].attention
        cache = KVCache(
            self.config.layer_kinds(), B, self.config.heads, N, first.fused_dim, first.fused_dim,
            mode=mode, window=(window or self.config.context_frames) if mode == "window" else None,
            dtype=self.dtype, device=device, start_frame=start_frame,
        )
        with torch.no_grad():
            base = self._token_base(residues)
        return Rollout(residues, dt, cache, None if origin is None else origin.to(self.dtype), base,
                       self._residue_angles(residues))

    def _slot_pass(self, rollout: Rollout, frames: Rigid, level: torch.Tensor, noisy: bool, frame: int):
        mask = rollout.residues.mask
        frames = self._prepare_frames(frames, mask)
        origin = rollout.origin
        if origin is None:
            origin = ca_centroid(frames, mask)
            if not noisy:
                rollout.origin = origin
        rots = frames.rots[:, None]
        trans = (frames.trans - origin[:, None])[:, None]
        flag = torch.tensor([noisy], device=mask.device)
        cond = self.conditioning(level.reshape(-1, 1).to(rollout.dt_ns), flag, rollout.dt_ns)
        x = rollout.token_base[:, None] + self.cond_to_token(cond)[:, :, None]
        frame_angles = self._frame_angles(torch.tensor([frame], device=mask.device))
        cos, sin = rope_tables(rollout.residue_angles, frame_angles, self.dtype)
        context = CachedContext(rollout.cache, frame, noisy, mask)
        x = self._trunk(x, cond, rots, trans, cos, sin, context)
        return x, cond, Rigid(rots, frames.trans[:, None])

    def append_clean(self, rollout: Rollout, frames: Rigid, tau, anchor: Rigid | None = None) -> None:
        """Append one clean history frame to the rollout's KV cache.

        Parameters
        ----------
        rollout : Rollout
        frames : Rigid, batch shape (B, N), nm
            The frame as the model should see it (contextual noise already applied).
        tau : float or torch.Tensor of shape (B,)
            Its context-noise level.
        anchor : Rigid, batch shape (B, N), nm, optional
            The same frame before contextual noise: the x0 anchor of the next noisy frame
            (``x0_anchor="previous"``); default ``frames``.
        """
        self._check_finite(frames, rollout.residues.mask, "history frames")
        if anchor is not None:
            self._check_finite(anchor, rollout.residues.mask, "history anchor frames")
        rollout.anchor = self._prepare_frames(anchor if anchor is not None else frames, rollout.residues.mask)
        rollout.anchors = (rollout.anchors + [rollout.anchor])[-self.config.anchor_frames:]
        frame = rollout.cache.next_frame()
        tau = torch.as_tensor(tau, dtype=torch.float64, device=rollout.dt_ns.device).reshape(-1).expand(rollout.dt_ns.shape)
        self._slot_pass(rollout, frames, tau, noisy=False, frame=frame)
        rollout.cache.commit(frame)

    def denoise(self, rollout: Rollout, noisy: Rigid, t) -> Rigid:
        """Predict the clean next frame from a noisy one, attending to the cached history.

        Parameters
        ----------
        rollout : Rollout
        noisy : Rigid, batch shape (B, N), nm, global coordinates
        t : float or torch.Tensor of shape (B,)
            Diffusion time.

        Returns
        -------
        Rigid, batch shape (B, N), nm
            Predicted x0 of frame ``rollout.cache.next_frame()``.
        """
        frame = rollout.cache.next_frame()
        t = torch.as_tensor(t, dtype=torch.float64, device=rollout.dt_ns.device).reshape(-1).expand(rollout.dt_ns.shape)
        x, cond, frames = self._slot_pass(rollout, noisy, t, noisy=True, frame=frame)
        if self.config.x0_anchor in ("previous", "posterior") and rollout.anchor is not None:
            previous = Rigid(rollout.anchor.rots[:, None], rollout.anchor.trans[:, None])
            anchor = previous
            if self.config.anchor_frames > 1:
                K = len(rollout.anchors)
                weights = torch.full((1, K), 1.0 / K, dtype=torch.float64, device=previous.trans.device)
                with _no_autocast(previous.trans.device):  # geometry stays in the parameter dtype
                    anchor = mean_frames(torch.stack([a.rots for a in rollout.anchors], 1),
                                         torch.stack([a.trans for a in rollout.anchors], 1), weights)
            if self._posterior is not None:
                origin_nm = ca_centroid(previous, rollout.residues.mask[:, None])
                scale = self._prior_scale(rollout.dt_ns)
                anchor = self._posterior.base(anchor, frames, origin_nm, t[:, None], scale)
                out = self._head(x, cond, anchor, t[:, None], torch.ones_like(t[:, None], dtype=torch.bool), scale)
                return Rigid(out.rots[:, 0], out.trans[:, 0])
            frames = anchor
        out = self._head(x, cond, frames)
        return Rigid(out.rots[:, 0], out.trans[:, 0])
