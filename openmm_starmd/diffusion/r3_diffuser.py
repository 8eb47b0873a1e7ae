"""Translation part of STAR-MD's SE(3) diffusion: FrameDiff's variance-preserving SDE on R^3.

Forward process, in diffusion units x = x_nm / coordinate_scale_nm:

    dx = -beta(t)/2 x dt + sqrt(beta(t)) dW,   beta(t) = beta_min + t (beta_max - beta_min),

so q(x_t | x_0) = N(a(t) x_0, v(t) I) with a(t) = exp(-B(t)/2), v(t) = 1 - exp(-B(t)) and
B(t) = beta_min t + (beta_max - beta_min) t^2 / 2. Its score at the sample is -(x_t - a x_0)/v.

Choices where the paper is silent (FrameDiff's unless stated):

* Scores are gradients with respect to the *scaled* coordinate x (units of 1/diffusion unit); with the
  default scale of 1 nm they are in nm^-1. Positions in and out are always in nm.
* No centring happens here: the VP prior is centred at the origin, so the caller centres each window
  (e.g. on its mean CA position) before noising and sampling. FrameDiff re-centred inside its reverse
  step; we leave that to the sampler, which knows which residues and frames form a window.
* The reverse step is Euler-Maruyama on the reverse SDE, or Euler on the probability-flow ODE.
"""
from __future__ import annotations

import torch

from ._times import as_tensor_time, as_times
from .config import DiffusionConfig

__all__ = ["R3Diffuser"]


class R3Diffuser:
    """VP-SDE on translations; positions in nm, batched over any leading shape.

    Parameters
    ----------
    config : DiffusionConfig, optional (defaults as in :class:`DiffusionConfig`).
    """

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config if config is not None else DiffusionConfig()
        c = self.config
        self._scale = c.coordinate_scale_nm
        self._b0, self._b1 = c.trans_beta_min, c.trans_beta_max

    # -- schedule -------------------------------------------------------------------------
    # Schedule functions take t as a float (-> float64 tensor) or a tensor (its dtype and device).
    def beta(self, t) -> torch.Tensor:
        """Noise rate beta(t) per unit time, t in [0, 1]."""
        return self._b0 + as_tensor_time(t) * (self._b1 - self._b0)

    def integrated_beta(self, t) -> torch.Tensor:
        """B(t) = int_0^t beta."""
        t = as_tensor_time(t)
        return self._b0 * t + 0.5 * (self._b1 - self._b0) * t * t

    def mean_coef(self, t) -> torch.Tensor:
        """a(t) = exp(-B(t)/2): E[x_t | x_0] = a(t) x_0."""
        return torch.exp(-0.5 * self.integrated_beta(t))

    def variance(self, t) -> torch.Tensor:
        """v(t) = 1 - exp(-B(t)) in diffusion units^2 (expm1 keeps it accurate at small t)."""
        return -torch.expm1(-self.integrated_beta(t))

    def score_scaling(self, t):
        """FrameDiff's translation score scaling 1/sqrt(v(t)) = sqrt(E|s|^2 / 3), the RMS of one score
        component; divide squared score errors by its square to weight the loss."""
        return torch.rsqrt(self.variance(t))

    # -- process --------------------------------------------------------------------------
    def sample_prior(self, shape, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        """x_1 ~ N(0, I) in diffusion units, returned in nm: (*shape, 3)."""
        z = torch.randn(*shape, 3, generator=generator, dtype=dtype, device=device)
        return z * self._scale

    def forward_marginal(self, x0: torch.Tensor, t, generator=None, noise: torch.Tensor | None = None):
        """Sample x_t ~ q(x_t | x_0) and its score.

        Parameters
        ----------
        x0 : torch.Tensor, (..., 3), nm
        t : float or torch.Tensor broadcastable to x0.shape[:-1], in [0, 1] (t > 0 for a finite score)
        generator : torch.Generator, optional, on x0's device
        noise : torch.Tensor, optional, (..., 3) standard normal draw to use instead of sampling

        Returns
        -------
        x_t : torch.Tensor, (..., 3), nm
        score : torch.Tensor, (..., 3), per diffusion unit: grad_x log q(x_t | x_0) = -noise / sqrt(v(t))
        """
        t = as_times(t, x0.shape[:-1], x0)[..., None]
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        std = torch.sqrt(self.variance(t))
        x_t = self.mean_coef(t) * (x0 / self._scale) + std * noise
        return x_t * self._scale, -noise / std

    def score(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """grad_x log q(x_t | x_0) = -(x_t - a x_0) / v, per diffusion unit; x_t, x0 (..., 3) in nm."""
        t = as_times(t, x_t.shape[:-1], x_t)[..., None]
        return -(x_t - self.mean_coef(t) * x0) / (self._scale * self.variance(t))

    def x0_from_score(self, x_t: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
        """Invert :meth:`score`: the x_0 (nm) whose conditional score at x_t is ``score``."""
        t = as_times(t, x_t.shape[:-1], x_t)[..., None]
        return (x_t / self._scale + self.variance(t) * score) / self.mean_coef(t) * self._scale

    def reverse_step(
        self,
        x_t: torch.Tensor,
        score: torch.Tensor,
        t,
        dt,
        noise_scale: float = 1.0,
        ode: bool = False,
        generator=None,
    ) -> torch.Tensor:
        """One step t -> t - dt of the reverse SDE (Euler-Maruyama) or the probability-flow ODE.

        SDE: x <- x + beta (x/2 + score) dt + noise_scale sqrt(beta dt) z.  ODE: x <- x + beta/2 (x + score) dt.
        x_t (..., 3) nm; score (..., 3) per diffusion unit; t, dt broadcastable to x_t.shape[:-1].
        Returns (..., 3) nm.
        """
        t = as_times(t, x_t.shape[:-1], x_t)[..., None]
        dt = torch.as_tensor(dt, dtype=x_t.dtype, device=x_t.device)
        dt = dt[..., None] if dt.ndim else dt
        x = x_t / self._scale
        beta = self.beta(t)
        if ode:
            x = x + 0.5 * beta * (x + score) * dt
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + beta * (0.5 * x + score) * dt + noise_scale * torch.sqrt(beta * dt) * z
        return x * self._scale
