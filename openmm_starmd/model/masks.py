"""The block-causal attention mask of STAR-MD, in one place.

Which part of STAR-MD: block-causal training over the sequence [clean frames 1..L, noisy frames
1..L], which makes one training pass equivalent to L autoregressive generation steps, and the
sliding-window variant used with a bounded KV cache.

Tokens are grouped in *slots*: all residues of one frame of one kind (clean or noisy). Visibility
is decided per (query slot, key slot):

- a clean slot of frame l sees clean slots of frames <= l;
- a noisy slot of frame l sees clean slots of frames < l and the noisy slot of frame l (itself);
- with a window W, every token sees only the most recent W of the clean frames it may see at all
  (frames > l - W for a clean query, frames >= l - W for a noisy query). A noisy frame thus always
  has W context frames once the history is long enough, and a clean frame W - 1 plus itself.

Residue masks (missing residues) remove keys; they are applied by the attention contexts in
:mod:`openmm_starmd.model.attention`, not here. The KV cache evaluates the very same function on the
frame indices of its slots, so the cached rollout and the full forward share one definition.
"""
from __future__ import annotations

import torch

__all__ = ["slot_visibility"]


def slot_visibility(
    q_frame: torch.Tensor,
    q_noisy: torch.Tensor,
    k_frame: torch.Tensor,
    k_noisy: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Whether a query slot may attend to a key slot.

    Parameters
    ----------
    q_frame, k_frame : torch.Tensor, integer, mutually broadcastable shapes
        Frame indices of query and key slots, e.g. (S, 1) and (1, S).
    q_noisy, k_noisy : torch.Tensor, bool, same shapes as the frame indices
        True for noisy slots, False for clean slots.
    window : int or None
        Sliding window W in frames; None for unbounded history.

    Returns
    -------
    torch.Tensor, bool, the broadcast shape
    """
    q_noisy = torch.as_tensor(q_noisy, dtype=torch.bool, device=k_frame.device)
    k_noisy = torch.as_tensor(k_noisy, dtype=torch.bool, device=k_frame.device)
    # The newest clean frame a query may use: its own for clean tokens, the previous for noisy ones.
    newest = q_frame - q_noisy.long()
    clean_key = ~k_noisy & (k_frame <= newest)
    if window is not None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1 frame, or None for unbounded history.")
        clean_key = clean_key & (k_frame > newest - window)
    noisy_key = k_noisy & q_noisy & (k_frame == q_frame)
    return clean_key | noisy_key
