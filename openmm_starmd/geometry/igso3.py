"""IGSO(3), the isotropic Gaussian on SO(3): the rotation noise of STAR-MD's SE(3) diffusion.

STAR-MD noises each residue frame's orientation with the Brownian motion on SO(3) used by FrameDiff
(Yim et al. 2023); after "time" sigma**2 the rotation R0^T R_t is IGSO(3)(sigma). The paper does not
restate the distribution; we follow FrameDiff's convention exactly, so sigma is the standard
deviation of the rotation vector in the small-sigma limit (rotation vectors -> N(0, sigma^2 I)).

Densities (omega = rotation angle in [0, pi], radians)
------------------------------------------------------
* Density with respect to the normalised Haar measure of SO(3), a class function of omega:

      p(omega; sigma) = sum_l (2l+1) exp(-l(l+1) sigma^2 / 2) sin((l+1/2) omega) / sin(omega/2).

* Marginal density of the angle on [0, pi] (what is sampled, and what integrates to 1):

      f(omega; sigma) = (1 - cos omega) / pi * p(omega; sigma),

  where (1 - cos omega)/pi is the angle density of a Haar-uniform rotation.

Two exact representations of the series are used, switching at ``SIGMA_SWITCH`` = 1.0:

* sigma >= 1: the character series itself, written as a cosine series (the Dirichlet kernel
  sin((l+1/2)w)/sin(w/2) = 1 + 2 sum_{k<=l} cos(k w)), which is smooth at omega = 0 and needs
  only ceil(11/sigma) + 2 <= 13 terms for exp(-60) truncation error.
* sigma < 1: the closed form obtained by Poisson resummation of the same series (the small-sigma
  expansion of Leach et al. 2022 / Nikolayev & Savyolov 1970), truncated to the images
  m in {-1, 0, 1}:

      p = e^{sigma^2/8} sqrt(2 pi) / sigma^3 / sin(omega/2)
          * sum_m (-1)^m (omega + 2 pi m) exp(-(omega + 2 pi m)^2 / (2 sigma^2)).

  The dropped images are smaller by <= 3 exp(-4 pi^2 / sigma^2) (2e-17 at sigma = 1), so both
  branches agree to machine precision at the switch. Unlike the series, which needs ~11/sigma terms
  that cancel catastrophically where the density is tiny, the closed form is evaluated in log space
  and stays accurate at every angle (the score at omega = pi for sigma = 0.05 is -1256.6, not noise).

Score convention
----------------
The score of an isotropic density centred on R0, at R = R0 exp(hat(v)) with omega = |v|, is returned
as the rotation vector

      s = d log p / d omega (omega; sigma) * v / omega,

which satisfies d/de log p(R exp(e hat(u)))|_{e=0} = s . u for every u: it is the Riemannian
gradient of log p written in the *body frame* of R (the tangent vector at R is R hat(s)). The
diffuser (openmm_starmd/diffusion/so3_diffuser.py) noises on the right, R_t = R_0 exp(hat(v)), and
steps on the right, so it uses exactly this vector. Note the score is that of the Haar-relative
density p, not of the angle density f (whose extra (1 - cos omega) factor is a volume Jacobian).

Tabulation
----------
:class:`IGSO3Table` tabulates, on a log-spaced sigma grid x a uniform omega grid on [0, pi], the angle
CDF (composite Simpson on cell midpoints, renormalised to end at exactly 1), d log p / d omega, and the
expected squared score norm E|s|^2 per sigma. Lookups interpolate linearly in log(sigma) and omega;
sampling inverts each neighbouring CDF row and interpolates the two quantiles (exact at grid sigmas).
:func:`igso3_table` caches tables in memory by their parameters.
"""
from __future__ import annotations

import functools
import math

import torch

from .so3 import exp_map

__all__ = [
    "SIGMA_SWITCH",
    "haar_angle_density",
    "series_density",
    "series_angle_cdf",
    "closed_form_log_density",
    "log_density",
    "density",
    "angle_density",
    "d_log_density",
    "score_vector",
    "IGSO3Table",
    "igso3_table",
]

SIGMA_SWITCH = 1.0
_TWO_PI = 2.0 * math.pi
_F64 = torch.float64


def _as_tensors(omega, sigma):
    """omega and sigma as float64 tensors on a common device (not broadcast: the series keeps
    per-sigma coefficients small when sigma is a column and omega a row)."""
    ref = omega if torch.is_tensor(omega) else sigma if torch.is_tensor(sigma) else None
    device = ref.device if ref is not None else None
    # float64 throughout: the tails span hundreds of e-folds; MPS has no float64.
    dtype = torch.float32 if device is not None and device.type == "mps" else _F64
    # as_tensor with the dtype given: a Python float must not pass through float32 on the way.
    omega = torch.as_tensor(omega, dtype=dtype, device=device)
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    return omega, sigma


def _tensor(x) -> torch.Tensor:
    """Tensors pass through; numbers and arrays become float64 (never via float32)."""
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=_F64)


def haar_angle_density(omega):
    """Angle density (1 - cos omega)/pi of a Haar-uniform rotation, omega in [0, pi] (rad)."""
    omega = _tensor(omega)
    return (1 - torch.cos(omega)) / math.pi


def _series_coefficients(sigma: torch.Tensor, l_max: int) -> torch.Tensor:
    """Cosine-series coefficients c_k, k = 0..l_max, of p(omega; sigma): shape sigma.shape + (l_max+1,)."""
    ell = torch.arange(l_max + 1, dtype=sigma.dtype, device=sigma.device)
    weights = (2 * ell + 1) * torch.exp(-ell * (ell + 1) * sigma[..., None] ** 2 / 2)
    # c_k = sum_{l >= k} (2l+1) e_l, doubled for k >= 1 (cos(kw) appears twice in the Dirichlet kernel).
    tail = weights.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([tail[..., :1], 2 * tail[..., 1:]], -1)


def _default_l_max(sigma: torch.Tensor) -> int:
    # exp(-l(l+1) sigma^2 / 2) < exp(-60) once l > 11/sigma.
    smallest = float(sigma.detach().min()) if sigma.numel() else 1.0
    if smallest <= 0:
        raise ValueError(f"sigma={smallest} is not positive; IGSO(3) needs sigma > 0 (use the identity for sigma = 0).")
    return int(math.ceil(11.0 / smallest)) + 2


def series_density(omega, sigma, l_max: int | None = None) -> torch.Tensor:
    """p(omega; sigma) by the truncated character series (reference form; exact for large sigma).

    Parameters
    ----------
    omega : array-like or torch.Tensor, rotation angle(s) in [0, pi], rad
    sigma : array-like or torch.Tensor, IGSO(3) scale(s) > 0, broadcastable with omega
    l_max : int, optional
        Highest degree kept; default ceil(11/min(sigma)) + 2 (truncation error < exp(-60)).
        Small sigma needs many terms that cancel where p is tiny: prefer :func:`log_density`.

    Returns
    -------
    torch.Tensor, broadcast shape, float64: density with respect to the normalised Haar measure.
    """
    omega, sigma = _as_tensors(omega, sigma)
    return _series(omega, sigma, l_max, derivative=False)[0]


def _series(omega: torch.Tensor, sigma: torch.Tensor, l_max: int | None, derivative: bool = True):
    """(p, dp/domega) by the cosine series; sigma is not broadcast so coefficients stay small."""
    l_max = _default_l_max(sigma) if l_max is None else int(l_max)
    coef = _series_coefficients(sigma, l_max)
    p = coef[..., 0] + torch.zeros_like(omega)
    dp = torch.zeros_like(p) if derivative else None
    for k in range(1, l_max + 1):
        p = p + coef[..., k] * torch.cos(k * omega)
        if derivative:
            dp = dp - k * coef[..., k] * torch.sin(k * omega)
    return p, dp


def series_angle_cdf(omega, sigma, l_max: int | None = None) -> torch.Tensor:
    """Exact angle CDF F(omega) = int_0^omega f by term-wise integration of the series.

    Uses (1 - cos w) sin((l+1/2) w)/sin(w/2) = cos(l w) - cos((l+1) w). Same arguments and caveats as
    :func:`series_density`; returns float64 values in [0, 1].
    """
    omega, sigma = _as_tensors(omega, sigma)
    l_max = _default_l_max(sigma) if l_max is None else int(l_max)
    F = omega - torch.sin(omega)
    for ell in range(1, l_max + 1):
        w = (2 * ell + 1) * torch.exp(-ell * (ell + 1) * sigma**2 / 2)
        F = F + w * (torch.sin(ell * omega) / ell - torch.sin((ell + 1) * omega) / (ell + 1))
    return F / math.pi


def _log_omega_over_sin_half(omega: torch.Tensor) -> torch.Tensor:
    # omega / sin(omega/2) = 2 / sinc(omega / (2 pi)); torch.sinc is smooth at 0.
    return math.log(2.0) - torch.log(torch.sinc(omega / _TWO_PI))


def _image_ratio(omega: torch.Tensor, sigma: torch.Tensor):
    """r = (sum of the m = -1, +1 images) / omega and dr/domega, both smooth at omega = 0.

    The images are (2pi - w) exp(-2pi(pi - w)/s^2) - (2pi + w) exp(-2pi(pi + w)/s^2); each exponent
    is <= 0 on [0, pi], so nothing overflows even where exp(-w^2 / 2s^2) underflows.
    """
    inv_s2 = 1.0 / sigma**2
    k = _TWO_PI * inv_s2
    e1 = torch.exp(-k * (math.pi - omega))
    e2 = torch.exp(-k * (math.pi + omega))
    n = (_TWO_PI - omega) * e1 - (_TWO_PI + omega) * e2
    dn = -e1 - e2 + k * ((_TWO_PI - omega) * e1 + (_TWO_PI + omega) * e2)
    tiny = omega < 1e-4
    w_safe = torch.where(tiny, torch.ones_like(omega), omega)
    r_direct = n / w_safe
    dr_direct = (dn * w_safe - n) / w_safe**2
    # Odd-in-omega numerator n = n1 w + n3 w^3 + ...: Taylor form below 1e-4 avoids 0/0.
    e0 = torch.exp(-k * math.pi)
    n1 = e0 * (4 * math.pi * k - 2)
    n3 = e0 * (_TWO_PI / 3 * k**3 - k**2)
    r = torch.where(tiny, n1 + n3 * omega**2, r_direct)
    dr = torch.where(tiny, 2 * n3 * omega, dr_direct)
    return r, dr


def closed_form_log_density(omega, sigma) -> torch.Tensor:
    """log p(omega; sigma) by the Poisson-resummed closed form (images m = -1, 0, 1).

    Accurate to ~1e-16 relative for sigma <= 1 at every omega in [0, pi]; degrades as
    3 exp(-4 pi^2 / sigma^2) above that (7e-8 at sigma = 1.5). Differentiable.
    """
    omega, sigma = _as_tensors(omega, sigma)
    return _closed_form(omega, sigma)[0]


def _closed_form(omega: torch.Tensor, sigma: torch.Tensor):
    """(log p, d log p / domega) by the closed form."""
    log_c = sigma**2 / 8 + 0.5 * math.log(_TWO_PI) - 3 * torch.log(sigma)
    r, dr = _image_ratio(omega, sigma)
    log_p = log_c - omega**2 / (2 * sigma**2) + _log_omega_over_sin_half(omega) + torch.log1p(r)
    # d/dw log(w / sin(w/2)) = 1/w - cot(w/2)/2, by its Taylor series near 0 where the terms cancel.
    small = omega < 1e-2
    w_safe = torch.where(small, torch.ones_like(omega), omega)
    direct = 1 / w_safe - 0.5 / torch.tan(w_safe / 2)
    taylor = omega / 12 + omega**3 / 720 + omega**5 / 30240
    h = torch.where(small, taylor, direct)
    return log_p, -omega / sigma**2 + h + dr / (1 + r)


def _evaluate(omega, sigma):
    """(log p, d log p / domega), broadcast, choosing the closed form below SIGMA_SWITCH."""
    omega, sigma = _as_tensors(omega, sigma)
    small = sigma < SIGMA_SWITCH
    if bool(small.all()):
        log_p, d_log_p = _closed_form(omega, sigma)
    elif not bool(small.any()):
        p, dp = _series(omega, sigma, None)
        log_p, d_log_p = torch.log(p), dp / p
    else:
        # Each branch sees a sigma clamped into its own range so the unused one stays finite
        # (and autograd through torch.where never meets a NaN).
        c_log_p, c_d = _closed_form(omega, sigma.clamp(max=SIGMA_SWITCH))
        p, dp = _series(omega, sigma.clamp(min=SIGMA_SWITCH), None)
        log_p = torch.where(small, c_log_p, torch.log(p))
        d_log_p = torch.where(small, c_d, dp / p)
    # (torch.broadcast_shapes would import sympy, ~1 s on first use.)
    log_p, d_log_p, _, _ = torch.broadcast_tensors(log_p, d_log_p, omega, sigma)
    return log_p, d_log_p


def log_density(omega, sigma) -> torch.Tensor:
    """log p(omega; sigma), density with respect to the normalised Haar measure on SO(3).

    Parameters
    ----------
    omega : array-like or torch.Tensor, rotation angle(s) in [0, pi], rad
    sigma : array-like or torch.Tensor, IGSO(3) scale(s) > 0, broadcastable with omega

    Returns
    -------
    torch.Tensor, broadcast shape, float64 (float32 on MPS). Closed form below ``SIGMA_SWITCH``,
    character series at and above it; differentiable in omega and sigma.
    """
    return _evaluate(omega, sigma)[0]


def density(omega, sigma) -> torch.Tensor:
    """p(omega; sigma) = exp(:func:`log_density`): density with respect to normalised Haar measure."""
    return torch.exp(log_density(omega, sigma))


def angle_density(omega, sigma) -> torch.Tensor:
    """Marginal density f(omega) = (1 - cos omega)/pi * p(omega; sigma) of the angle on [0, pi]."""
    log_p = log_density(omega, sigma)
    omega = torch.as_tensor(omega, dtype=log_p.dtype, device=log_p.device)
    return haar_angle_density(omega) * torch.exp(log_p)


def d_log_density(omega, sigma) -> torch.Tensor:
    """d log p / d omega (omega; sigma) in rad^-1, analytic; 0 at omega = 0 and omega = pi.

    Same arguments, shapes and branch switch as :func:`log_density`.
    """
    return _evaluate(omega, sigma)[1]


def score_vector(rotvec: torch.Tensor, sigma) -> torch.Tensor:
    """Exact (untabulated) body-frame score of IGSO(3)(sigma) centred at the identity, at exp(hat(rotvec)).

    rotvec : (..., 3) rotation vectors, rad; sigma broadcastable to rotvec.shape[:-1].
    Returns (..., 3) in rad^-1, float64. Slow reference for tests; the diffuser uses
    :meth:`IGSO3Table.score`.
    """
    rotvec = _tensor(rotvec)
    omega = rotvec.norm(dim=-1)
    coef = d_log_density(omega, sigma)
    safe = torch.where(omega > 0, omega, torch.ones_like(omega))
    return (coef / safe.to(coef.dtype))[..., None] * rotvec.to(coef.dtype)


class IGSO3Table:
    """IGSO(3) on a (sigma, omega) grid: angle CDF, d log p / d omega and E|score|^2, with sampling.

    Parameters
    ----------
    sigma_min, sigma_max : float
        Range of scales covered (rad), 0 < sigma_min < sigma_max. Lookups outside it raise.
    n_sigma : int, optional
        Number of log-spaced scales; default 100 per e-fold of sigma_max/sigma_min (>= 2).
    n_omega : int, optional
        Number of uniform angle cells on [0, pi]; default max(1000, ceil(20 pi / sigma_min)), so that
        the bulk of the narrowest distribution spans >= 20 cells.

    Attributes
    ----------
    sigmas : (n_sigma,) float64 tensor, rad
    omegas : (n_omega + 1,) float64 tensor, rad, omegas[0] = 0, omegas[-1] = pi
    cdf : (n_sigma, n_omega + 1) angle CDF, cdf[:, 0] = 0, cdf[:, -1] = 1
    d_log_p : (n_sigma, n_omega + 1) d log p / d omega, rad^-1
    score_norm_sq : (n_sigma,) E|s|^2 under IGSO(3)(sigma), rad^-2
    normalisation_error : float, max |int f - 1| over the grid before renormalising (quadrature check)

    All methods take tensors on any device, compute in float64 and return the input's dtype; pass a
    ``torch.Generator`` on that device for reproducible sampling.
    """

    def __init__(self, sigma_min: float, sigma_max: float, n_sigma: int | None = None, n_omega: int | None = None):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(
                f"IGSO3Table(sigma_min={sigma_min}, sigma_max={sigma_max}) needs 0 < sigma_min < sigma_max; "
                "pass an increasing pair of positive scales."
            )
        if n_sigma is None:
            n_sigma = max(2, int(math.ceil(100 * math.log(sigma_max / sigma_min))) + 1)
        if n_omega is None:
            n_omega = max(1000, int(math.ceil(20 * math.pi / sigma_min)))
        if n_sigma < 2 or n_omega < 2:
            raise ValueError(f"IGSO3Table needs n_sigma >= 2 and n_omega >= 2, got {n_sigma} and {n_omega}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.n_sigma, self.n_omega = int(n_sigma), int(n_omega)
        self._log_sigma0 = math.log(sigma_min)
        self._d_log_sigma = (math.log(sigma_max) - math.log(sigma_min)) / (n_sigma - 1)
        self._d_omega = math.pi / n_omega

        self.sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), n_sigma, dtype=_F64))
        self.omegas = torch.linspace(0.0, math.pi, n_omega + 1, dtype=_F64)
        mids = self.omegas[:-1] + 0.5 * self._d_omega
        f_grid, d_grid = self._rows(self.omegas)
        f_mid, d_mid = self._rows(mids)

        cell = self._d_omega / 6 * (f_grid[:, :-1] + 4 * f_mid + f_grid[:, 1:])
        cdf = torch.cat([torch.zeros(n_sigma, 1, dtype=_F64), cell.cumsum(-1)], -1)
        total = cdf[:, -1:].clone()
        self.normalisation_error = float((total - 1).abs().max())
        self.cdf = cdf / total
        self.cdf[:, -1] = 1.0
        self.d_log_p = d_grid
        g_grid = d_grid**2 * f_grid
        moment = (self._d_omega / 6 * (g_grid[:, :-1] + 4 * d_mid**2 * f_mid + g_grid[:, 1:])).sum(-1)
        self.score_norm_sq = moment / total[:, 0]
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _rows(self, omegas: torch.Tensor):
        """Angle density f and d log p / d omega on (n_sigma, len(omegas)), each branch on its own rows."""
        f = torch.empty(self.n_sigma, len(omegas), dtype=_F64)
        d = torch.empty_like(f)
        small = self.sigmas < SIGMA_SWITCH
        for rows in (small, ~small):
            if rows.any():
                log_p, d_log_p = _evaluate(omegas[None, :], self.sigmas[rows, None])
                f[rows] = haar_angle_density(omegas) * torch.exp(log_p)
                d[rows] = d_log_p
        return f, d

    def __repr__(self) -> str:
        return (
            f"IGSO3Table(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"n_sigma={self.n_sigma}, n_omega={self.n_omega})"
        )

    # -- device copies and grid coordinates -------------------------------------------------
    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._device_cache:
            dtype = torch.float32 if device.type == "mps" else _F64
            rows = 2.0 * torch.arange(self.n_sigma, dtype=_F64)[:, None]
            self._device_cache[device] = {
                "cdf": self.cdf.to(device, dtype),
                # Row i shifted into [2i, 2i+1]: one searchsorted over all rows at once.
                "flat_cdf": (self.cdf + rows).reshape(-1).to(device, dtype),
                "d_log_p": self.d_log_p.to(device, dtype),
                "log_score_norm_sq": torch.log(self.score_norm_sq).to(device, dtype),
            }
        return self._device_cache[device]

    def _sigma_coords(self, sigma: torch.Tensor, check: bool):
        """Lower grid index i (..., long) and weight w in [0, 1] for log-linear interpolation."""
        if check and sigma.numel():
            lo, hi = float(sigma.min()), float(sigma.max())
            if lo < self.sigma_min * (1 - 1e-9) or hi > self.sigma_max * (1 + 1e-9):
                raise ValueError(
                    f"sigma in [{lo:.6g}, {hi:.6g}] is outside this table's range "
                    f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}]; build one that covers it with "
                    f"igso3_table(sigma_min, sigma_max)."
                )
        x = (torch.log(sigma) - self._log_sigma0) / self._d_log_sigma
        x = x.clamp(0.0, self.n_sigma - 1.0)
        i = x.floor().long().clamp(max=self.n_sigma - 2)
        return i, x - i

    def _prepare(self, sigma, like: torch.Tensor | None, check: bool):
        device = like.device if like is not None else (sigma.device if torch.is_tensor(sigma) else None)
        tabs = self._tables(device if device is not None else torch.device("cpu"))
        sigma = torch.as_tensor(sigma, dtype=tabs["cdf"].dtype, device=device)
        return tabs, sigma, self._sigma_coords(sigma, check)

    def _omega_lerp(self, table: torch.Tensor, row: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        # NaN angles (e.g. from a diverged network) must come out as NaN, not as a garbage index
        bad = torch.isnan(omega)
        x = (torch.where(bad, torch.zeros_like(omega), omega) / self._d_omega).clamp(0.0, float(self.n_omega))
        j = x.floor().long().clamp(max=self.n_omega - 1)
        a = x - j
        out = (1 - a) * table[row, j] + a * table[row, j + 1]
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    # -- lookups --------------------------------------------------------------------------
    def cdf_at(self, omega: torch.Tensor, sigma, check: bool = True) -> torch.Tensor:
        """Angle CDF F(omega; sigma) by bilinear interpolation; omega (...), rad; sigma broadcastable."""
        omega = _tensor(omega)
        tabs, sigma, (i, w) = self._prepare(sigma, omega, check)
        om, i, w = torch.broadcast_tensors(omega.to(sigma.dtype), i, w)
        lo = self._omega_lerp(tabs["cdf"], i, om)
        hi = self._omega_lerp(tabs["cdf"], i + 1, om)
        return ((1 - w) * lo + w * hi).to(omega.dtype if omega.is_floating_point() else sigma.dtype)

    def d_log_density(self, omega: torch.Tensor, sigma, check: bool = True) -> torch.Tensor:
        """Tabulated d log p / d omega (rad^-1), bilinear in (log sigma, omega)."""
        omega = _tensor(omega)
        tabs, sigma, (i, w) = self._prepare(sigma, omega, check)
        om, i, w = torch.broadcast_tensors(omega.to(sigma.dtype), i, w)
        lo = self._omega_lerp(tabs["d_log_p"], i, om)
        hi = self._omega_lerp(tabs["d_log_p"], i + 1, om)
        return ((1 - w) * lo + w * hi).to(omega.dtype)

    def score(self, rotvec: torch.Tensor, sigma, check: bool = True) -> torch.Tensor:
        """Body-frame score of IGSO(3)(sigma) centred at the identity, at exp(hat(rotvec)).

        Parameters
        ----------
        rotvec : torch.Tensor, (..., 3), rad. For noise centred on R0 pass log(R0^T R).
        sigma : float or torch.Tensor broadcastable to rotvec.shape[:-1], rad

        Returns
        -------
        torch.Tensor, (..., 3), rad^-1, dtype of rotvec: d log p/d omega * rotvec / |rotvec| (0 at 0).
        """
        tabs, sigma, (i, w) = self._prepare(sigma, rotvec, check)
        v = rotvec.to(sigma.dtype)
        omega = v.norm(dim=-1)
        om, i, w = torch.broadcast_tensors(omega, i, w)
        table = tabs["d_log_p"]
        s = (1 - w) * self._omega_lerp(table, i, om) + w * self._omega_lerp(table, i + 1, om)
        # s(omega)/omega is finite at 0 (s is odd): use the first cell's slope there.
        slope0 = ((1 - w) * table[i, 1] + w * table[i + 1, 1]) / self._d_omega
        coef = torch.where(om > 0, s / torch.where(om > 0, om, torch.ones_like(om)), slope0)
        return (coef[..., None] * v).to(rotvec.dtype)

    def score_norm_sq_at(self, sigma, check: bool = True) -> torch.Tensor:
        """E|s|^2 (rad^-2) under IGSO(3)(sigma); log-log interpolation (E|s|^2 ~ 3/sigma^2 at small sigma)."""
        like = sigma if torch.is_tensor(sigma) else None
        tabs, sigma, (i, w) = self._prepare(sigma, like, check)
        log_e = tabs["log_score_norm_sq"]
        out = torch.exp((1 - w) * log_e[i] + w * log_e[i + 1])
        return out.to(like.dtype) if like is not None and like.is_floating_point() else out

    # -- sampling -------------------------------------------------------------------------
    def _inverse_cdf_row(self, flat: torch.Tensor, row: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        stride = self.n_omega + 1
        start = row * stride
        value = 2.0 * row.to(u.dtype) + u
        pos = torch.searchsorted(flat, value.reshape(-1)).reshape(value.shape)
        pos = torch.minimum(torch.maximum(pos, start + 1), start + self.n_omega)
        lo, hi = flat[pos - 1], flat[pos]
        frac = ((value - lo) / (hi - lo).clamp_min(torch.finfo(u.dtype).tiny)).clamp(0.0, 1.0)
        return ((pos - 1 - start).to(u.dtype) + frac) * self._d_omega

    def sample_angle(self, sigma, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
        """Rotation angles omega ~ f(.; sigma) by inverse CDF, one per element of ``sigma``.

        sigma : torch.Tensor (...), rad (its device is used; the generator must live there)
        Returns (...) angles in [0, pi], dtype of sigma.
        """
        sigma_in = _tensor(sigma)
        tabs, sig, (i, w) = self._prepare(sigma_in, sigma_in, check)
        u = torch.rand(sig.shape, generator=generator, dtype=sig.dtype, device=sig.device)
        flat = tabs["flat_cdf"]
        lo = self._inverse_cdf_row(flat, i, u)
        hi = self._inverse_cdf_row(flat, i + 1, u)
        out_dtype = sigma_in.dtype if sigma_in.is_floating_point() else sig.dtype
        return ((1 - w) * lo + w * hi).to(out_dtype)

    def sample_rotvec(self, sigma, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
        """Rotation vectors of IGSO(3)(sigma): angle by inverse CDF times a uniform axis. (...) -> (..., 3)."""
        sigma = _tensor(sigma)
        omega = self.sample_angle(sigma, generator=generator, check=check)
        axis = torch.randn(*omega.shape, 3, generator=generator, dtype=omega.dtype, device=omega.device)
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(omega.dtype).tiny)
        return omega[..., None] * axis

    def sample(self, sigma, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
        """Rotation matrices of IGSO(3)(sigma) centred at the identity: (...) -> (..., 3, 3)."""
        return exp_map(self.sample_rotvec(sigma, generator=generator, check=check))


@functools.lru_cache(maxsize=16)
def igso3_table(
    sigma_min: float, sigma_max: float, n_sigma: int | None = None, n_omega: int | None = None
) -> IGSO3Table:
    """Cached :class:`IGSO3Table` (built once per distinct argument tuple per process)."""
    return IGSO3Table(float(sigma_min), float(sigma_max), n_sigma=n_sigma, n_omega=n_omega)
