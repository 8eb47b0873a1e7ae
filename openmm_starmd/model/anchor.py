"""The x0 anchors: the frame each residue's predicted clean frame is an update of.

Two parts: the *history mean* (``ModelConfig.anchor_frames`` > 1) replaces "the previous frame" by
the mean of the last H clean frames (before contextual noise) as the anchor of "previous" and the
prior centre of "posterior" (:func:`history_weights`, :func:`mean_frames`); and the "posterior"
blend of that centre with the noisy input (:class:`PosteriorAnchor`).

Why a history mean: at frame spacings of 10 ps and more, MD Cα positions fluctuate about a slowly
moving mean, so the mean of the last 7 frames predicts the next frame better than the last frame
does (Cα RMSE 20 % lower on 11 of our 12 shards at Δt = 0.01-0.1 ns, e.g. crambin 0.55 vs 0.70 Å,
1ENH 0.65 vs 0.82 Å), and it keeps chain geometry (mean consecutive Cα-Cα 3.76-3.84 Å). It also
makes the "unsure network" default mean-reverting: "no motion" about the previous frame turns
per-frame errors into a random walk, the mean about the history damps them.

Which part of STAR-MD: the output parameterisation of the denoiser (our choice; the paper keeps
FrameDiff's, see :class:`openmm_starmd.model.config.ModelConfig` ``x0_anchor``). The network
predicts x0 = base ∘ update; with ``x0_anchor="posterior"`` the base is the Gaussian posterior mean
of the clean frame given

- the noisy input x_t of the slot, diffused about the origin o (the previous frame's Cα centroid,
  :func:`openmm_starmd.model.sequence.noisy_frame_origins`): x_t = o + α(t) (x0 − o) + σ(t) ε for
  the Cα (VP-SDE, nm), and R_t = R_0 · IGSO(3)(σ_r(t)) for the rotation;
- a prior centred on the previous frame before contextual noise (the anchor a, R_a):
  x0 ~ N(a, s² I), R_0 = R_a · exp(N(0, s_r² I)).

Translations (exact for the Gaussian model): E[x0 | x_t] = a + c (x_t − o − α (a − o)) with
c = α s² / (α² s² + σ²). Rotations (small-angle Gaussian approximation of IGSO(3), whose rotation
vector has per-axis spread σ_r): R = R_a · exp(c_r · log(R_aᵀ R_t)), c_r = s_r² / (s_r² + σ_r²).
At t → 0 the base tends to the noisy input (c → 1), at large t to the anchor (c → 0). Both maps
commute with global rotations and translations, so the network stays SE(3)-equivariant.

The network's rigid update on top of the base is scaled by the posterior standard deviation
(:meth:`PosteriorAnchor.output_scales`, EDM's c_out): without it, a network trained at all t
applied corrections of the same size at t = 0.001 as at t = 0.3, and its x0 there was twice as far
from the truth as the base alone (0.37 vs 0.18 Å; ``training/denoise_check.py``, 600 steps).
"""
from __future__ import annotations

import torch

from ..diffusion.config import DiffusionConfig
from ..diffusion.r3_diffuser import R3Diffuser
from ..diffusion.so3_diffuser import rot_sigma
from ..geometry.rigid import Rigid
from ..geometry.so3 import exp_map, log_map, project_to_so3

__all__ = ["PosteriorAnchor", "posterior_mean_trans", "history_weights", "mean_frames"]


def history_weights(frame_index: torch.Tensor, noisy: torch.Tensor, frames: int) -> torch.Tensor:
    """Averaging weights of the history-mean anchor over the slots of a block-causal sequence.

    Parameters
    ----------
    frame_index : torch.Tensor, shape (S,), long
    noisy : torch.Tensor, shape (S,), bool
    frames : int
        H, how many of the most recent clean frames a noisy slot averages.

    Returns
    -------
    torch.Tensor, shape (S, S), float64
        Row s: equal weights on the clean slots of frames f_s - H .. f_s - 1 when slot s is noisy
        and has at least one of them; otherwise 1 on slot s itself (clean slots, and the first
        frame of a window, keep their own frame).
    """
    f = frame_index
    inside = (f[None, :] < f[:, None]) & (f[None, :] >= f[:, None] - frames)
    w = (noisy[:, None] & ~noisy[None, :] & inside).to(torch.float64)
    count = w.sum(dim=1, keepdim=True)
    own = torch.eye(f.shape[0], dtype=torch.float64, device=f.device)
    return torch.where(count > 0, w / count.clamp_min(1), own)


def mean_frames(rots: torch.Tensor, trans: torch.Tensor, weights: torch.Tensor) -> Rigid:
    """Weighted means of frames along a slot axis: arithmetic for the Cα, chordal for rotations.

    Parameters
    ----------
    rots : torch.Tensor, (B, T, N, 3, 3); trans : torch.Tensor, (B, T, N, 3), nm
    weights : torch.Tensor, (S, T), rows summing to 1

    Returns
    -------
    Rigid, batch shape (B, S, N), nm. A row with a single weight of 1 returns that frame exactly.
    """
    w = weights.to(trans.dtype)
    mean_t = torch.einsum("st,btnc->bsnc", w, trans)
    mean_r = project_to_so3(torch.einsum("st,btnij->bsnij", w, rots))
    single = (weights == 1).any(dim=1)
    if bool(single.any()):  # keep those exact (the SVD would return them up to rounding)
        pick = weights.argmax(dim=1)
        mask = single[None, :, None]
        mean_t = torch.where(mask[..., None], trans[:, pick], mean_t)
        mean_r = torch.where(mask[..., None, None], rots[:, pick], mean_r)
    return Rigid(mean_r, mean_t)


def posterior_mean_trans(noisy_nm: torch.Tensor, anchor_nm: torch.Tensor, origin_nm: torch.Tensor,
                         alpha, sigma_nm, prior_nm) -> torch.Tensor:
    """E[x0 | x_t] under x0 ~ N(anchor, prior² I) and x_t = o + α (x0 − o) + σ ε.

    Parameters
    ----------
    noisy_nm, anchor_nm : torch.Tensor, (..., N, 3), nm, global coordinates
    origin_nm : torch.Tensor, (..., 3), nm, the diffusion origin
    alpha, sigma_nm : float or torch.Tensor broadcastable to (..., N, 3)
        Mean coefficient and noise standard deviation (nm) of the translation process at t.
    prior_nm : float or torch.Tensor broadcastable to (..., N, 3)
        Standard deviation of the displacement prior, nm per coordinate.
    """
    c = alpha * prior_nm ** 2 / (alpha ** 2 * prior_nm ** 2 + sigma_nm ** 2)
    o = origin_nm[..., None, :]
    return anchor_nm + c * (noisy_nm - o - alpha * (anchor_nm - o))


class PosteriorAnchor:
    """Posterior-mean base frames for a diffusion schedule and prior scales.

    Parameters
    ----------
    diffusion_config : DiffusionConfig
        The schedule the noisy frames were made with (must match the diffuser's).
    prior_nm : float
        Prior standard deviation of each Cα coordinate about the anchor, nm.
    prior_rad : float
        Prior standard deviation of the rotation about the anchor, rad per axis.
    dt_exponent, dt_ref_ns : float
        Both widths scale by (Δt / dt_ref_ns)^dt_exponent (:meth:`prior_scale`); 0 keeps them fixed.

    Every method taking ``scale`` multiplies both prior widths by it (a tensor broadcastable to
    t, from :meth:`prior_scale`; None: unscaled).
    """

    def __init__(self, diffusion_config: DiffusionConfig, prior_nm: float, prior_rad: float,
                 dt_exponent: float = 0.0, dt_ref_ns: float = 0.1):
        self.config = diffusion_config
        self.r3 = R3Diffuser(diffusion_config)
        self.prior_nm = float(prior_nm)
        self.prior_rad = float(prior_rad)
        self.dt_exponent = float(dt_exponent)
        self.dt_ref_ns = float(dt_ref_ns)

    def prior_scale(self, dt_ns: torch.Tensor) -> torch.Tensor | None:
        """(Δt / dt_ref_ns)^dt_exponent per batch element, float64, shape like ``dt_ns`` (ns);
        None when the prior is fixed (dt_exponent 0), so the fixed path is unchanged bit for bit."""
        if self.dt_exponent == 0.0:
            return None
        return (dt_ns.to(torch.float64) / self.dt_ref_ns) ** self.dt_exponent

    def _widths(self, scale: torch.Tensor | None):
        if scale is None:
            return self.prior_nm, self.prior_rad
        return self.prior_nm * scale, self.prior_rad * scale

    def _noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha(t), the translation noise sigma(t) in nm and the rotation sigma_r(t) in rad (float64)."""
        t = t.to(torch.float64)
        sigma_nm = torch.sqrt(self.r3.variance(t)) * self.config.coordinate_scale_nm
        return self.r3.mean_coef(t), sigma_nm, rot_sigma(self.config, t)

    def weights(self, t: torch.Tensor, scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blend weights at diffusion times t (any shape, float64 recommended).

        Returns
        -------
        alpha : torch.Tensor, like t
            Mean coefficient of the translation process.
        c_trans, c_rot : torch.Tensor, like t, in [0, 1]
            Weight of the noisy input in the translation and rotation blends.
        """
        alpha, sigma_nm, sigma_rot = self._noise(t)
        prior_nm, prior_rad = self._widths(scale)
        s2 = prior_nm ** 2
        c_trans = alpha * s2 / (alpha ** 2 * s2 + sigma_nm ** 2)
        c_rot = prior_rad ** 2 / (prior_rad ** 2 + sigma_rot ** 2)
        return alpha, c_trans, c_rot

    def output_scales(self, t: torch.Tensor, scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales of the network's update at diffusion times t: the posterior standard deviation
        over the prior's, σ / sqrt(α² s² + σ²) for the Cα and σ_r / sqrt(s_r² + σ_r²) per rotation
        axis (EDM's c_out). At t → 0 the base is already the answer and the correction vanishes
        with the noise; at large t the update is in units of the prior scale.

        Returns
        -------
        k_trans, k_rot : torch.Tensor, like t, in (0, 1]
        """
        alpha, sigma_nm, sigma_rot = self._noise(t)
        prior_nm, prior_rad = self._widths(scale)
        k_trans = sigma_nm / torch.sqrt(alpha ** 2 * prior_nm ** 2 + sigma_nm ** 2)
        k_rot = sigma_rot / torch.sqrt(prior_rad ** 2 + sigma_rot ** 2)
        return k_trans, k_rot

    def base(self, anchor: Rigid, noisy: Rigid, origin_nm: torch.Tensor, t: torch.Tensor,
             scale: torch.Tensor | None = None) -> Rigid:
        """The posterior-mean frames.

        Parameters
        ----------
        anchor, noisy : Rigid, batch shape (..., N), nm, global coordinates
            Prior centre (previous frame before contextual noise) and the noisy input x_t.
        origin_nm : torch.Tensor, shape (..., 3), nm
            Diffusion origin of the noisy frame.
        t : torch.Tensor, shape (...)
            Its diffusion time.

        Returns
        -------
        Rigid, batch shape (..., N), nm, in the anchor's dtype.
        """
        dtype = anchor.trans.dtype
        alpha, sigma_nm, _ = (w.to(dtype)[..., None, None] for w in self._noise(t))
        c_r = self.weights(t, scale)[2].to(dtype)[..., None, None]
        prior_nm = self.prior_nm if scale is None else (self.prior_nm * scale).to(dtype)[..., None, None]
        trans = posterior_mean_trans(noisy.trans.to(dtype), anchor.trans, origin_nm.to(dtype), alpha, sigma_nm,
                                     prior_nm)
        delta = log_map(anchor.rots.transpose(-1, -2) @ noisy.rots.to(dtype))
        rots = anchor.rots @ exp_map(c_r * delta)
        return Rigid(rots, trans)
