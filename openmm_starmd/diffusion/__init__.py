"""SE(3) diffusion of residue frames: forward noising, scores, reverse steps and their schedules.

Imports only ``openmm_starmd.geometry``. The network predicts clean frames; this package turns
predictions into scores and steps (FrameDiff's split between model and diffuser).
"""
from .config import DiffusionConfig
from .r3_diffuser import R3Diffuser
from .se3_diffuser import SE3Diffuser
from .so3_diffuser import SO3Diffuser

__all__ = ["DiffusionConfig", "R3Diffuser", "SO3Diffuser", "SE3Diffuser"]
