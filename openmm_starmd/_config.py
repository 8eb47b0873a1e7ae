"""JSON round trip shared by the package's config dataclasses (model, diffusion, sampling).

Configs travel inside checkpoints as plain dicts, so a checkpoint alone rebuilds what made it and
loading one never runs code. Unknown keys are an error (a typo or a newer writer must not pass
silently); missing keys take the field defaults, after :meth:`JsonConfig._upgrade` has filled in
what older writers meant.
"""
from __future__ import annotations

import dataclasses

__all__ = ["JsonConfig"]


class JsonConfig:
    """Mixin for dataclasses: ``to_dict`` / ``from_dict`` with a clear error for unknown keys."""

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def _upgrade(cls, d: dict) -> dict:
        """Fill in keys that dicts written by older versions lack (default: none)."""
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of :meth:`to_dict`; unknown keys raise, missing keys take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_dict got unknown keys {unknown}; remove them, or use the openmm-starmd "
                f"version that wrote this config (valid keys: {sorted(names)})."
            )
        return cls(**cls._upgrade(dict(d)))
