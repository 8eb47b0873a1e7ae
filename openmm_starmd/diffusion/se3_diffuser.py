"""STAR-MD's SE(3) diffusion over residue frames: IGSO(3) on rotations x VP-SDE on translations.

The two factors are independent given x_0 (FrameDiff), so each is noised, scored and stepped by its
own diffuser (so3_diffuser.py, r3_diffuser.py); this module only composes them over
:class:`~openmm_starmd.geometry.rigid.Rigid` frames and adds what STAR-MD needs on top:

* :meth:`SE3Diffuser.contextual_noise`, the small forward-process perturbation STAR-MD applies to the
  clean history frames that the model attends to, identical in training and at inference
  (tau ~ U[0, context_tau_max], see :meth:`SE3Diffuser.sample_context_tau`);
* :meth:`SE3Diffuser.scores_from_x0` and :meth:`SE3Diffuser.reverse_step`, which turn the network's
  prediction of the clean frame into scores and a step (the network never sees a score).

Equivariance of the noising (exact, with the same noise draw): rotating x_0 about the origin,
(R_0, x_0) -> (Q R_0, Q x_0), maps R_t -> Q R_t (body-frame noise commutes with a left rotation) and
x_t -> Q x_t provided the translation noise is rotated too (z -> Q z; N(0, I) is isotropic, so the
laws are equivariant). Translating x_0 by c does *not* translate x_t by c: the VP process shrinks
towards the origin, so x_t -> x_t + a(t) c while R_t and both scores are unchanged. Hence callers centre
each window before noising. Random draws happen in a fixed order (rotation angle, rotation axis,
translation noise) so a seeded ``torch.Generator`` reproduces a call exactly.
"""
from __future__ import annotations

import torch

from ..geometry.igso3 import igso3_table
from ..geometry.rigid import Rigid
from ..geometry.so3 import exp_map
from ._times import as_times
from .config import DiffusionConfig
from .r3_diffuser import R3Diffuser
from .so3_diffuser import SO3Diffuser

__all__ = ["SE3Diffuser"]


def _check_rigid(rigid: Rigid, name: str) -> torch.Size:
    rots, trans = rigid
    if rots.shape[-2:] != (3, 3) or trans.shape[-1:] != (3,) or rots.shape[:-2] != trans.shape[:-1]:
        raise ValueError(
            f"{name} has rots {tuple(rots.shape)} and trans {tuple(trans.shape)}; expected rots S+(3, 3) "
            f"and trans S+(3,) with the same batch shape S."
        )
    return rots.shape[:-2]


class SE3Diffuser:
    """Forward noising, scores and reverse steps for frames of any batch shape S.

    Frames are ``Rigid(rots S+(3, 3), trans S+(3,) in nm)``; times ``t`` are floats or tensors
    broadcastable to S (e.g. (B, L, 1) per frame of a (B, L, N) batch). Everything is batched torch,
    works in float32 and float64 on CPU and CUDA, and takes an optional ``torch.Generator`` living on
    the frames' device.

    Scores: ``rot_score`` S+(3,) in rad^-1 is the body-frame rotation vector (geometry/igso3.py);
    ``trans_score`` S+(3,) is per diffusion unit (nm^-1 at the default ``coordinate_scale_nm`` = 1).

    No centring happens here: the VP prior is centred at the origin, so the caller centres each window.

    Parameters
    ----------
    config : DiffusionConfig, optional (defaults as in :class:`DiffusionConfig`).
    """

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config if config is not None else DiffusionConfig()
        self.so3 = SO3Diffuser(self.config)
        self.r3 = R3Diffuser(self.config)

    def forward_marginal(self, rigid0: Rigid, t, generator=None) -> tuple[Rigid, torch.Tensor, torch.Tensor]:
        """Sample x_t ~ q(x_t | x_0) and the scores of q(x_t | x_0) at the sample.

        Parameters
        ----------
        rigid0 : Rigid, clean frames (rots S+(3, 3), trans S+(3,) nm)
        t : float or torch.Tensor broadcastable to S, in (0, 1] (t = 0 gives an infinite trans score)
        generator : torch.Generator, optional

        Returns
        -------
        rigid_t : Rigid, noised frames, same shapes and dtype
        rot_score : torch.Tensor, S+(3,), rad^-1, body frame
        trans_score : torch.Tensor, S+(3,), per diffusion unit
        """
        _check_rigid(rigid0, "rigid0")
        rots, rot_score = self.so3.forward_marginal(rigid0.rots, t, generator=generator)
        trans, trans_score = self.r3.forward_marginal(rigid0.trans, t, generator=generator)
        return Rigid(rots, trans), rot_score, trans_score

    def sample_prior(self, shape, generator=None, dtype=torch.float32, device=None) -> Rigid:
        """x_1: Haar-uniform rotations and translations ~ N(0, I) in diffusion units (nm at scale 1).

        shape : tuple, the batch shape S. Returns Rigid(rots S+(3, 3), trans S+(3,) nm).
        """
        shape = tuple(shape)
        rots = self.so3.sample_prior(shape, generator=generator, dtype=dtype, device=device)
        trans = self.r3.sample_prior(shape, generator=generator, dtype=dtype, device=device)
        return Rigid(rots, trans)

    def scores_from_x0(self, rigid_t: Rigid, rigid0_pred: Rigid, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(rot_score, trans_score) of q(x_t | x_0 = rigid0_pred) at rigid_t: how a predicted clean
        frame becomes a score. Shapes and units as in :meth:`forward_marginal`."""
        _check_rigid(rigid_t, "rigid_t")
        _check_rigid(rigid0_pred, "rigid0_pred")
        rot_score = self.so3.score(rigid_t.rots, rigid0_pred.rots, t)
        trans_score = self.r3.score(rigid_t.trans, rigid0_pred.trans, t)
        return rot_score, trans_score

    def reverse_step(
        self,
        rigid_t: Rigid,
        rigid0_pred: Rigid,
        t,
        dt,
        noise_scale: float = 1.0,
        ode: bool = False,
        generator=None,
    ) -> Rigid:
        """One step from t to t - dt given the network's clean-frame prediction.

        Euler-Maruyama on the reverse SDE (``ode=False``; ``noise_scale`` multiplies the injected noise)
        or Euler on the probability-flow ODE (``ode=True``). Rotations step on the right in the body
        frame, translations in diffusion units. ``t`` and ``dt`` broadcast to S; dt > 0.
        Returns Rigid at t - dt.
        """
        rot_score, trans_score = self.scores_from_x0(rigid_t, rigid0_pred, t)
        rots = self.so3.reverse_step(
            rigid_t.rots, rot_score, t, dt, noise_scale=noise_scale, ode=ode, generator=generator
        )
        trans = self.r3.reverse_step(
            rigid_t.trans, trans_score, t, dt, noise_scale=noise_scale, ode=ode, generator=generator
        )
        return Rigid(rots, trans)

    def contextual_noise(self, rigid0: Rigid, tau, generator=None) -> Rigid:
        """Perturb clean history frames with the forward process from time 0 to small time ``tau``.

        STAR-MD's contextual noise: the frames the model conditions on are perturbed at level
        tau ~ U[0, context_tau_max] (:meth:`sample_context_tau`), in training and at inference alike,
        so the model never relies on its own (imperfect) history being exact.

        Translations follow the VP marginal q(x_tau | x_0) exactly. Rotations get the forward
        process's *increment* from t = 0 to t = tau: IGSO(3) is the heat kernel on SO(3), so scales
        add in quadrature and the increment is IGSO(3)(sqrt(sigma(tau)^2 - sigma(0)^2)). This makes
        tau = 0 the clean frame exactly (sigma(0) = rot_sigma_min = 0.1 rad would otherwise jitter
        every history frame by ~0.1 rad even at tau = 0), while a frame that is already a t = 0 sample
        ends at sigma(tau). At the defaults, tau = 0.1 means a translation std of 0.32 nm and a rotation
        scale of 0.36 rad.

        rigid0 : Rigid, S; tau : float or tensor broadcastable to S in [0, 1]. Returns Rigid, S.
        """
        batch = _check_rigid(rigid0, "rigid0")
        tau = as_times(tau, batch, rigid0.trans, name="tau")
        sigma0 = self.so3.sigma(torch.zeros_like(tau))
        sigma_ctx = (self.so3.sigma(tau) ** 2 - sigma0**2).clamp_min(0).sqrt()
        rotvec = self._context_rotvec(sigma_ctx, generator).to(rigid0.rots.dtype)
        rots = rigid0.rots @ exp_map(rotvec)
        trans, _ = self.r3.forward_marginal(rigid0.trans, tau, generator=generator)
        return Rigid(rots, trans)

    # below this scale IGSO(3) and an isotropic Gaussian on so(3) differ by O(sigma^2) ~ 1e-3
    _CONTEXT_SIGMA_FLOOR = 0.03

    def _context_rotvec(self, sigma: torch.Tensor, generator=None) -> torch.Tensor:
        """IGSO(3)(sigma) rotation vectors for contextual noise, sigma (...) in [0, ~0.4] -> (..., 3)."""
        floor = self._CONTEXT_SIGMA_FLOOR
        top = float(self.so3.sigma(torch.tensor(self.config.context_tau_max, dtype=torch.float64)))
        top = max(top, 2 * floor)
        sigma = sigma.clamp(max=top)
        # both draws are always made so the generator advances the same way whatever sigma is
        tabled = igso3_table(floor, top, n_sigma=64, n_omega=2000).sample_rotvec(sigma.clamp(min=floor), generator=generator, check=False)
        gauss = sigma[..., None] * torch.randn(
            *sigma.shape, 3, generator=generator, dtype=sigma.dtype, device=sigma.device
        )
        return torch.where((sigma < floor)[..., None], gauss.to(tabled.dtype), tabled)

    def sample_context_tau(self, shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """tau ~ U[0, context_tau_max] of the given shape (e.g. (B, L, 1): one level per frame)."""
        u = torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)
        return u * self.config.context_tau_max

    def time_grid(self, num_steps: int, dtype=torch.float64, device=None) -> torch.Tensor:
        """(num_steps + 1,) times from 1 down to t_min, evenly spaced: step k goes ts[k] -> ts[k+1]
        with dt = ts[k] - ts[k+1] = (1 - t_min) / num_steps."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1; pass the number of reverse steps.")
        return torch.linspace(1.0, self.config.t_min, num_steps + 1, dtype=dtype, device=device)

    def trans_score_scaling(self, t) -> torch.Tensor:
        """sqrt(E|trans_score|^2 / 3) = 1/sqrt(v(t)) (FrameDiff): loss = |pred - true|^2 / scaling^2."""
        return self.r3.score_scaling(t)

    def rot_score_scaling(self, t) -> torch.Tensor:
        """sqrt(E|rot_score|^2 / 3) at sigma(t) (FrameDiff): loss = |pred - true|^2 / scaling^2."""
        return self.so3.score_scaling(t)
