"""Joint spatio-temporal invariant point attention, fused into one SDPA call.

Which part of STAR-MD: the attention that replaces pair features and triangle updates. Every
token (residue i, frame l, clean or noisy) attends at once to all tokens it may see under the
block-causal mask (:mod:`openmm_starmd.model.masks`), with

- scalar queries/keys carrying the 2D RoPE of (residue, frame) (:mod:`openmm_starmd.model.rope`);
- IPA-style geometry: each head forms query/key/value points in the token's local residue frame
  and maps them to global coordinates; the logit gains -γ_h w_C / 2 · Σ_p ||q_p - k_p||² (γ_h =
  softplus of a learned scalar, w_C = sqrt(2 / (9 P)) as in AlphaFold's IPA), and the attended
  value points are mapped back into the *query's* local frame and passed on as invariant
  features (the points and their norms). No global coordinate enters a scalar feature, so the
  layer is SE(3)-invariant by construction.

Fusion. -w||q - k||² = 2w q·k - w||k||² - w||q||², and the last term is the same for every key of a
query, so it cancels in the softmax. We therefore append sqrt(w)·(global query points) and a 1 to
the scaled scalar query, and sqrt(w)·(global key points) and the bias -w/2·||k_pts||² to the scalar
key, and call ``scaled_dot_product_attention`` with ``scale=1`` (the 1/sqrt(d) of the scalar term
is applied to q beforehand). Value points travel as extra value channels.

Numerics. Global points are taken relative to an origin near the protein (chosen by the caller and
fixed for a whole rollout), so ||k_pts||² stays O(nm²) and the expanded form does not cancel
catastrophically in float32. Under autocast the projections may run in bf16, but the points, the
fused q/k/v and the attention itself run in the dtype of the frames.

Layouts. ``project`` returns (B, H, S, N, E) tensors: S slots (frames of one kind), N residues.
Attention contexts decide which keys each query sees: :class:`FullContext` here for a whole
sequence, :class:`openmm_starmd.model.kv_cache.CachedContext` for one slot against the KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .masks import slot_visibility
from .rope import apply_rope

__all__ = ["InvariantPointAttention", "FullContext", "sdpa"]


def _slot_selector(slots: list[int], device):
    """A function picking ``slots`` (sorted indices) along dim 2 of a (B, H, S, N, E) tensor: a view
    when they are contiguous, a gather otherwise."""
    lo, n = slots[0], len(slots)
    if slots == list(range(lo, lo + n)):
        return lambda x: x.narrow(2, lo, n)
    index = torch.tensor(slots, dtype=torch.long, device=device)
    return lambda x: x.index_select(2, index)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with the fused point term: q and k already carry every scale, so ``scale=1``."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class InvariantPointAttention(nn.Module):
    """Projections in and out of the fused invariant point attention.

    Parameters
    ----------
    width : int
        Token feature size C.
    heads : int
        Number of heads H; scalar head size d = C / H.
    query_points, value_points : int
        Points per head for queries/keys (P_q) and values (P_v).
    """

    def __init__(self, width: int, heads: int, query_points: int, value_points: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.query_points, self.value_points = query_points, value_points
        # one projection for scalar q, k, v and the local query, key and value points (one GEMM)
        self.n_points = heads * (2 * query_points + value_points)
        self.to_inputs = nn.Linear(width, 3 * width + 3 * self.n_points)
        # softplus(0.5413) = 1: every head starts with the IPA weight w_C.
        self.point_logit = nn.Parameter(torch.full((heads,), 0.5413))
        self.out = nn.Linear(heads * (self.head_dim + 4 * value_points), width)

    @property
    def key_dim(self) -> int:
        """Channels of a fused query/key: scalar, 3 per point, one bias column."""
        return self.head_dim + 3 * self.query_points + 1

    @property
    def value_dim(self) -> int:
        """Channels of a fused value: scalar and 3 per value point."""
        return self.head_dim + 3 * self.value_points

    @property
    def fused_dim(self) -> int:
        """Channels of the fused q, k and v as stored: both padded with zeros to one multiple of 8.

        Equal q/k/v sizes let PyTorch's fused CPU attention kernel run instead of the unfused
        reference path (about 3x faster at our sizes).
        """
        return -(-max(self.key_dim, self.value_dim) // 8) * 8

    def project(
        self,
        x: torch.Tensor,
        rots: torch.Tensor,
        trans: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused queries, keys and values of the tokens.

        Parameters
        ----------
        x : torch.Tensor, shape (B, S, N, C)
            Normalised token features.
        rots : torch.Tensor, shape (B, S, N, 3, 3)
            Residue frame rotations.
        trans : torch.Tensor, shape (B, S, N, 3), nm
            Residue frame origins (Cα) relative to the attention origin.
        cos, sin : torch.Tensor, shape (B, S, N, d/2)
            RoPE tables.

        Returns
        -------
        q, k, v : torch.Tensor, shape (B, H, S, N, E)
            In the dtype of ``rots``; E = :attr:`fused_dim`. q and k hold d + 3 P_q + 1 channels,
            v holds d + 3 P_v, each followed by zero padding.
        """
        inputs = self.to_inputs(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._fuse(inputs.to(rots.dtype), rots, trans, cos, sin)

    def _fuse(self, inputs, rots, trans, cos, sin):
        B, S, N, _ = inputs.shape
        H, d, Pq, Pv = self.heads, self.head_dim, self.query_points, self.value_points
        dtype = rots.dtype
        C = H * d
        qk = inputs[..., : 2 * C].unflatten(-1, (2, H, d)).permute(3, 0, 4, 1, 2, 5)  # (2, B, H, S, N, d)
        qk = apply_rope(qk, cos[:, None], sin[:, None])
        q, k = qk[0] / math.sqrt(d), qk[1]
        v = inputs[..., 2 * C : 3 * C].unflatten(-1, (H, d)).permute(0, 3, 1, 2, 4)

        pts = _to_global(rots, trans, inputs[..., 3 * C :].unflatten(-1, (self.n_points, 3)))
        qk_pts = pts[..., : 2 * H * Pq, :].unflatten(-2, (2, H, Pq)).permute(3, 0, 4, 1, 2, 5, 6)
        v_pts = pts[..., 2 * H * Pq :, :].reshape(B, S, N, H, Pv * 3).permute(0, 3, 1, 2, 4)

        gamma = F.softplus(self.point_logit.to(dtype)) * math.sqrt(2.0 / (9.0 * Pq))
        root = gamma.sqrt().view(1, H, 1, 1, 1, 1)
        q_pts, k_pts = qk_pts[0] * root, qk_pts[1] * root  # (B, H, S, N, Pq, 3)
        k_bias = -0.5 * (k_pts * k_pts).sum((-1, -2), keepdim=False)[..., None]
        ones = torch.ones_like(k_bias)
        E = self.fused_dim
        pad_k = k_bias.new_zeros(k_bias.shape[:-1] + (E - self.key_dim,))
        pad_v = k_bias.new_zeros(k_bias.shape[:-1] + (E - self.value_dim,))
        q = torch.cat([q, q_pts.flatten(-2), ones, pad_k], dim=-1)
        k = torch.cat([k, k_pts.flatten(-2), k_bias, pad_k], dim=-1)
        v = torch.cat([v, v_pts, pad_v], dim=-1)
        return q, k, v

    def output(self, o: torch.Tensor, rots: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """Invariant features of the attended values, projected back to width C.

        Parameters
        ----------
        o : torch.Tensor, shape (B, H, S, N, E)
            Attention output (scalar values, global value points, padding).
        rots, trans : as in :meth:`project`.

        Returns
        -------
        torch.Tensor, shape (B, S, N, C)
        """
        B, H, S, N, _ = o.shape
        d, Pv = self.head_dim, self.value_points
        o = o.permute(0, 2, 3, 1, 4)  # (B, S, N, H, E)
        with torch.autocast(device_type=o.device.type, enabled=False):
            scalar = o[..., :d].flatten(-2)
            pts = o[..., d : self.value_dim].reshape(B, S, N, H * Pv, 3)
            local = torch.einsum("bsnji,bsnpj->bsnpi", rots, pts - trans[..., None, :])
            norms = torch.sqrt((local * local).sum(-1) + 1e-8)
            feats = torch.cat([scalar, local.flatten(-2), norms], dim=-1)
        return self.out(feats)


def _to_global(rots: torch.Tensor, trans: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Local points (B, S, N, P, 3) -> global R p + t, same shape."""
    return torch.einsum("bsnij,bsnpj->bsnpi", rots, pts) + trans[..., None, :]


class FullContext:
    """Attention over a whole token sequence under the block-causal (and window) mask.

    Parameters
    ----------
    slot_frame : torch.Tensor, shape (S,), long
        Frame index of every slot.
    slot_noisy : torch.Tensor, shape (S,), bool
        True for noisy slots.
    valid : torch.Tensor, shape (B, N), bool
        Residue mask; invalid residues are removed as keys.
    window : int or None
        Sliding window in frames.

    Notes
    -----
    In "time" layers a missing residue would have no key left at all, so every token also sees
    itself; a missing residue's own output is meaningless and never seen by valid tokens.

    "joint" layers do not call SDPA once on all S·N tokens with an (S·N)² mask: query slots are
    grouped by the set of key slots they may see, and each group attends to only those (one SDPA
    call per group, keys gathered, the residue mask the only mask). Under the block-causal layout
    of training ([clean 1..L, noisy 1..L]) a slot sees at most L of the 2L slots, and half of them
    on average, so this computes L(L+1)/(4L²) ≈ 28 % of the dense scores at L = 8: measured 4.3x
    faster forward + backward on the CPU (B 4, L 8, N 48). The result is the same attention:
    masked keys had weight exactly 0.
    """

    def __init__(self, slot_frame, slot_noisy, valid, window=None):
        S = slot_frame.shape[0]
        B, N = valid.shape
        vis = slot_visibility(slot_frame[:, None], slot_noisy[:, None], slot_frame[None, :], slot_noisy[None, :], window)
        self._frame = valid[:, None, None, None, :]  # (B, 1, 1, 1, N): keys of the query's own slot
        eye = torch.eye(S, dtype=torch.bool, device=valid.device)
        # (B, 1, N, S, S): same residue, visible slot, key valid or the token itself
        self._time = vis[None, None, None] & (valid[:, None, :, None, None] | eye)
        # "joint": query slots grouped by the key slots they see, in order of their first query slot
        groups: dict[tuple, list[int]] = {}
        for s, row in enumerate(vis.cpu().tolist()):
            groups.setdefault(tuple(i for i, seen in enumerate(row) if seen), []).append(s)
        all_valid = bool(valid.all())
        self._groups = []
        for keys, queries in groups.items():
            mask = None if all_valid else valid[:, None, None, :].repeat(1, 1, 1, len(keys))  # (B, 1, 1, K N)
            self._groups.append((_slot_selector(queries, valid.device), _slot_selector(keys, valid.device), len(queries),
                                 mask))
        order = [s for queries in groups.values() for s in queries]
        self._inverse = None
        if order != list(range(S)):
            self._inverse = torch.empty(S, dtype=torch.long, device=valid.device)
            self._inverse[torch.tensor(order, device=valid.device)] = torch.arange(S, device=valid.device)

    def attend(self, layer: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, S, N, E) -> attention output (B, H, S, N, E_v)."""
        B, H, S, N, _ = q.shape
        if kind == "joint":
            outs = []
            for q_sel, k_sel, n_q, mask in self._groups:
                out = sdpa(q_sel(q).flatten(2, 3), k_sel(k).flatten(2, 3), k_sel(v).flatten(2, 3), mask)
                outs.append(out.view(B, H, n_q, N, -1))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            return out if self._inverse is None else out.index_select(2, self._inverse)
        if kind == "frame":
            return sdpa(q, k, v, self._frame)
        if kind == "time":
            out = sdpa(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), self._time)
            return out.transpose(2, 3)
        raise ValueError(f"attention kind {kind!r} is unknown; use 'joint', 'frame' or 'time'.")
