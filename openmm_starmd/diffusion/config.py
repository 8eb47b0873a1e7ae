"""Configuration of STAR-MD's SE(3) diffusion (noise schedules, time range, contextual noise).

STAR-MD diffuses residue frames with FrameDiff's SE(3) process and, like ConfRover, keeps FrameDiff's
schedules; the paper does not restate their constants, so the defaults are FrameDiff's: a VP-SDE on
translations with linear beta(t) from 0.1 to 20 and IGSO(3) on rotations with the logarithmic sigma
schedule from 0.1 to 1.5 rad. Our one change of unit: FrameDiff diffuses Angstrom * 0.1, i.e. nm,
so ``coordinate_scale_nm = 1.0`` (one diffusion unit is one nanometre) reproduces it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .._config import JsonConfig

__all__ = ["DiffusionConfig"]


@dataclass
class DiffusionConfig(JsonConfig):
    """Schedules of the SE(3) diffusion; serialised inside checkpoints via :meth:`to_dict`.

    Attributes
    ----------
    coordinate_scale_nm : float
        Nanometres per diffusion unit: translations enter the VP-SDE as x_nm / coordinate_scale_nm,
        so the prior N(0, I) has a standard deviation of ``coordinate_scale_nm`` nm.
    trans_beta_min, trans_beta_max : float
        Linear VP-SDE noise rate beta(t) = beta_min + t (beta_max - beta_min), per unit diffusion time.
    rot_sigma_min, rot_sigma_max : float
        IGSO(3) scale (rad) at t = 0 and t = 1 of sigma(t) = log(t e^sigma_max + (1 - t) e^sigma_min).
    t_min : float
        Smallest diffusion time reached when sampling (the reverse process runs 1 -> t_min).
    context_tau_max : float
        Contextual noise level: history frames are noised to a time tau ~ U[0, context_tau_max].
    """

    coordinate_scale_nm: float = 1.0
    trans_beta_min: float = 0.1
    trans_beta_max: float = 20.0
    rot_sigma_min: float = 0.1
    rot_sigma_max: float = 1.5
    t_min: float = 0.01
    context_tau_max: float = 0.1

    def __post_init__(self):
        checks = [
            (self.coordinate_scale_nm > 0, "coordinate_scale_nm must be > 0 (nm per diffusion unit)"),
            (0 < self.trans_beta_min < self.trans_beta_max, "need 0 < trans_beta_min < trans_beta_max"),
            (0 < self.rot_sigma_min < self.rot_sigma_max, "need 0 < rot_sigma_min < rot_sigma_max (rad)"),
            (0 < self.t_min < 1, "t_min must lie in (0, 1)"),
            (0 <= self.context_tau_max <= 1, "context_tau_max must lie in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DiffusionConfig: {message}; got {self}.")
