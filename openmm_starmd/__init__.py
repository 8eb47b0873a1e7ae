"""openmm-starmd: STAR-MD generative protein dynamics for OpenMM users.

The public face, importable from the top level (loaded lazily, so ``import openmm_starmd`` stays
cheap): :class:`StarMDIntegrator`, :func:`prepare_protein`, :func:`load_model`.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "StarMDIntegrator": "openmm_starmd.integrator",
    "prepare_protein": "openmm_starmd.prepare",
    "load_model": "openmm_starmd.checkpoints",
    "save_model": "openmm_starmd.checkpoints",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openmm_starmd' has no attribute {name!r}")
