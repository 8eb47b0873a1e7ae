"""Diffusion-time arguments: one place that validates t and broadcasts it over a batch of frames."""
from __future__ import annotations

import torch


def as_tensor_time(t) -> torch.Tensor:
    """Tensors pass through; Python numbers become float64 tensors (never rounded via float32)."""
    return t if torch.is_tensor(t) else torch.as_tensor(t, dtype=torch.float64)


def as_times(t, batch_shape: torch.Size, like: torch.Tensor, name: str = "t") -> torch.Tensor:
    """``t`` as a tensor of shape ``batch_shape`` with the dtype and device of ``like``.

    Parameters
    ----------
    t : float or torch.Tensor, diffusion time(s) in [0, 1], broadcastable to ``batch_shape``
        (e.g. (B, L, 1) for frames of batch shape (B, L, N)).
    batch_shape : torch.Size, the frames' batch shape S.
    like : torch.Tensor, supplies dtype and device.
    name : str, the argument's name for error messages.
    """
    if isinstance(t, (int, float)):
        # Checked on the host: a sampler passing float times never waits on the device.
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name}={t} is outside the diffusion time range [0, 1]; clamp or rescale it.")
        return torch.full(tuple(batch_shape), float(t), dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    batch_shape = tuple(batch_shape)
    # Plain-Python broadcast check: torch.broadcast_shapes imports sympy (~1 s) on first use.
    t_shape = (1,) * (len(batch_shape) - t.ndim) + tuple(t.shape)
    if len(t_shape) > len(batch_shape) or any(a not in (1, b) for a, b in zip(t_shape, batch_shape)):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to frames of batch shape "
            f"{batch_shape}; give it shape {batch_shape} or one with 1s in the dims it shares "
            f"(e.g. (B, L, 1) for per-frame times)."
        )
    if t.numel() and (bool((t < 0).any()) or bool((t > 1).any())):
        raise ValueError(
            f"{name} has values in [{float(t.min()):.4g}, {float(t.max()):.4g}] outside the diffusion "
            f"time range [0, 1]; clamp or rescale it."
        )
    return t.expand(batch_shape)
