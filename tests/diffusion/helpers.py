"""Shared reference distributions for the diffusion tests (independent of the IGSO3Table code)."""
import math

import numpy as np
import torch
from scipy import integrate

from openmm_starmd.geometry import igso3


def igso3_angle_cdf(sigma: float, n: int = 20001):
    """CDF of the IGSO(3)(sigma) rotation angle by cumulative Simpson on a fine grid."""
    w = np.linspace(0.0, math.pi, n)
    f = igso3.angle_density(torch.as_tensor(w), sigma).numpy()
    F = integrate.cumulative_simpson(f, x=w, initial=0.0)
    return lambda x: np.interp(x, w, F / F[-1])


def haar_angle_cdf(x):
    return (x - np.sin(x)) / np.pi
