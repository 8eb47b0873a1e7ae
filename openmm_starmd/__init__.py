"""openmm-starmd: STAR-MD generative protein dynamics for OpenMM users."""
__version__ = "0.1.0"
