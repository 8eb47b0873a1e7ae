"""The KV cache of clean history tokens, and attention of one new slot against it.

Which part of STAR-MD: the key/value cache that makes autoregressive generation cost one pass over
the N tokens of the new frame per reverse step, instead of a pass over the whole history.

What is cached. For every attention layer that can look across frames ("joint" and "time"
layers) the fused keys and values of every clean history token (scalar parts after RoPE, global
key/value points, the point bias column; see :mod:`openmm_starmd.model.attention`). "frame"
layers only ever see the tokens of their own slot, so they need no cache.

Slots. The buffers are (B, H, capacity, N, E): one slot per frame. The tokens currently being
processed (a noisy frame during a reverse step, or a clean frame being appended) are written into a
*scratch* slot and attend over the buffer like any other slot; appending a clean frame then just
marks its scratch slot as committed, so no concatenation copies the history.

- ``mode="full"``: slot = frame - first frame; capacity grows by 25% (at least 16 slots) when
  full, so at most a quarter of it is unused. Memory O(L N).
- ``mode="window"``: a ring of W + 1 slots, slot = frame mod (W + 1). The slot a new frame
  reuses holds the frame W + 1 back, which the sliding-window mask already hides. Memory O(W N).

Which slots a query may see is decided by :func:`openmm_starmd.model.masks.slot_visibility` on the
slots' frame indices, the same function the full block-causal forward uses, so the two agree
exactly (up to floating-point summation order).
"""
from __future__ import annotations

import torch

from .attention import sdpa
from .masks import slot_visibility

__all__ = ["KVCache", "CachedContext"]

_MODES = ("full", "window")


class KVCache:
    """Fused keys/values of committed clean frames, per cross-frame attention layer.

    Parameters
    ----------
    layer_kinds : list of str
        Kind of every layer ("joint", "time" or "frame"); only non-"frame" layers are cached.
    batch, heads, residues : int
        B, H, N.
    key_dim, value_dim : int
        Fused key and value channels per head.
    mode : {"full", "window"}
    window : int or None
        Sliding window W in frames; required for ``mode="window"``, ignored for "full".
    dtype, device
        Of the buffers.
    start_frame : int
        Frame index of the first frame that will be appended (non-zero when a rollout is rebuilt
        from its most recent frames).
    """

    def __init__(
        self,
        layer_kinds,
        batch: int,
        heads: int,
        residues: int,
        key_dim: int,
        value_dim: int,
        mode: str = "window",
        window: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        start_frame: int = 0,
    ):
        if mode not in _MODES:
            raise ValueError(f"cache mode {mode!r} is unknown; use one of {_MODES}.")
        if mode == "window" and (window is None or window < 1):
            raise ValueError(f"cache mode 'window' needs a window of at least 1 frame, got {window!r}.")
        self.mode = mode
        self.window = window if mode == "window" else None
        self.cached_layers = [i for i, kind in enumerate(layer_kinds) if kind != "frame"]
        self._shape = (batch, heads, residues)
        self._dims = (key_dim, value_dim)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        capacity = window + 1 if mode == "window" else 16
        self._allocate(capacity)
        self.start_frame = int(start_frame)
        self.last_frame: int | None = None

    def _allocate(self, capacity: int) -> None:
        B, H, N = self._shape
        Ek, Ev = self._dims
        keys = {i: torch.zeros(B, H, capacity, N, Ek, dtype=self.dtype, device=self.device) for i in self.cached_layers}
        values = {i: torch.zeros(B, H, capacity, N, Ev, dtype=self.dtype, device=self.device) for i in self.cached_layers}
        frames = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        if hasattr(self, "slot_frame"):  # growing: keep what is there
            n = self.capacity
            for i in self.cached_layers:
                keys[i][:, :, :n] = self.keys[i]
                values[i][:, :, :n] = self.values[i]
            frames[:n] = self.slot_frame
        self.keys, self.values, self.slot_frame = keys, values, frames

    @property
    def capacity(self) -> int:
        """Number of slots currently allocated."""
        return self.slot_frame.shape[0]

    @property
    def n_frames(self) -> int:
        """Frames of the rollout so far: index of the next frame (evicted and skipped ones included)."""
        return self.next_frame()

    def next_frame(self) -> int:
        """Frame index the next appended clean frame must have."""
        return self.start_frame if self.last_frame is None else self.last_frame + 1

    def slot_for(self, frame: int) -> int:
        """Slot that holds (or will hold) ``frame``; grows a full cache as needed."""
        if self.mode == "window":
            return frame % self.capacity
        slot = frame - self.start_frame
        if slot < 0:
            raise ValueError(f"frame {frame} precedes the first frame {self.start_frame} of this cache; append frames in order.")
        if slot >= self.capacity:
            self._allocate(max(self.capacity + max(16, self.capacity // 4), slot + 1))
        return slot

    def slots_in_use(self, slot: int) -> int:
        """How many leading slots a query writing into ``slot`` must look at."""
        return self.capacity if self.mode == "window" else slot + 1

    def commit(self, frame: int) -> None:
        """Mark the scratch slot of ``frame`` as the committed clean frame ``frame``."""
        if frame != self.next_frame():
            raise ValueError(f"clean frame {frame} committed where frame {self.next_frame()} is due; append frames consecutively.")
        self.slot_frame[self.slot_for(frame)] = frame
        self.last_frame = frame

    def memory_bytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())


class CachedContext:
    """Attention of the tokens of one slot (frame ``frame``, clean or noisy) against the cache.

    Parameters
    ----------
    cache : KVCache
    frame : int
        Frame index of the current tokens.
    noisy : bool
        True for a reverse-diffusion step on a noisy frame, False when appending a clean frame.
    valid : torch.Tensor, shape (B, N), bool
        Residue mask.

    Notes
    -----
    The current tokens' keys/values are written into their scratch slot before attending; that
    slot becomes history only through :meth:`KVCache.commit`. In joint and frame layers a missing
    residue's query sees the valid keys; in time layers it sees itself (cf. FullContext).
    """

    def __init__(self, cache: KVCache, frame: int, noisy: bool, valid: torch.Tensor):
        self.cache = cache
        self.slot = cache.slot_for(frame)
        n = cache.slots_in_use(self.slot)
        self.n = n
        device = valid.device
        slot_frame = cache.slot_frame[:n]
        scratch = torch.arange(n, device=device) == self.slot
        q_frame = torch.tensor(frame, device=device)
        seen = slot_visibility(q_frame, torch.tensor(noisy, device=device), slot_frame,
                               torch.zeros(n, dtype=torch.bool, device=device), cache.window)
        ok = scratch | ((slot_frame >= 0) & seen)  # (n,)
        B, N = valid.shape
        if bool(ok.all()) and bool(valid.all()):
            # the common case (every slot visible, no missing residue): no mask at all, which
            # spares SDPA a (B, H, N, n N) mask in long full-cache rollouts
            self._joint = self._time = self._frame = None
            return
        self._joint = (ok[None, :, None] & valid[:, None, :]).reshape(B, 1, 1, n * N)
        self._time = ok & (valid[:, None, :, None, None] | scratch)  # (B, 1, N, 1, n)
        self._frame = valid[:, None, None, :]

    def attend(self, layer: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, 1, N, E) -> attention output (B, H, 1, N, E_v)."""
        if kind == "frame":
            return sdpa(q[:, :, 0], k[:, :, 0], v[:, :, 0], self._frame)[:, :, None]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[:, :, self.slot] = k[:, :, 0]
        values[:, :, self.slot] = v[:, :, 0]
        keys, values = keys[:, :, : self.n], values[:, :, : self.n]
        if kind == "joint":
            return sdpa(q[:, :, 0], keys.flatten(2, 3), values.flatten(2, 3), self._joint)[:, :, None]
        if kind == "time":
            out = sdpa(q[:, :, 0, :, None], keys.transpose(2, 3), values.transpose(2, 3), self._time)
            return out.transpose(2, 3)
        raise ValueError(f"attention kind {kind!r} is unknown; use 'joint', 'frame' or 'time'.")
