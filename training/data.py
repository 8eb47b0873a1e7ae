"""Training windows for STAR-MD: L frames at a random stride, Δt ~ LogUniform[0.01, 10] ns.

STAR-MD is trained on windows of L consecutive *sampled* frames x_1..x_L separated by a physical
time step Δt that varies per example (log-uniform over 10 ps .. 10 ns), so one model learns to
step at any Δt it is conditioned on (AdaLN). A trajectory saved every s ns can only provide Δt
that are multiples of s with (L - 1) Δt within its length, so per example we:

1. pick a protein uniformly (not a trajectory: proteins with more replicas are not favoured),
   then one of its replicas uniformly;
2. draw log Δt uniformly in [log max(dt_min, s), log min(dt_max, s * floor((F - 1) / (L_min - 1)))]
   (the part of the requested range this trajectory supports), round Δt / s to the nearest
   integer stride k ≥ 1 and return the realised Δt = k s;
3. take as many frames as fit at that stride, ``min(L, floor((F - 1) / k) + 1)`` (at least
   ``L_min``), and pick the start frame uniformly among those for which they fit. With
   ``min_window = L`` every example has L frames (the paper's setting on 100-ns ATLAS runs);
   a smaller ``min_window`` lets short trajectories serve large Δt with fewer frames (4 ns at
   10 ps frames: L = 8 reaches Δt 0.57 ns, L_min = 4 reaches 1.33 ns). Shorter examples are
   padded at the end with copies of their last frame and ``frame_mask = False``; block-causal
   attention never lets a real frame see a later one, so padding changes nothing but the loss
   weight, and the loss skips padded frames;
   A trajectory with reconstructed restarts (``training/restore_md.py``: side chains rebuilt on
   its backbone at that frame) serves windows below ``RESTART_MIN_DT_NS`` (1 ns) only from the
   stretches between restarts, since the step across one is measurably larger at 10-100 ps;
4. crop chains longer than ``max_residues`` to a contiguous random window of residues (the
   paper trains on ATLAS chains cropped to a residue budget; contiguous crops keep the chain
   geometry intact);
5. superpose every frame of the window on its first frame (Kabsch on the Cα of valid residues,
   :func:`fit_window`), as ATLAS's ``*_fit.xtc`` trajectories are fitted. Raw implicit-solvent
   MD tumbles and drifts: with Langevin friction 1/ps a 30-residue protein's centre diffuses
   ~0.5 nm² in 0.1 ns and the whole chain rotates, motion no model can predict, which would
   otherwise dominate every frame-to-frame target (measured on neopetrosiamide: 0.19 nm² mean
   squared Cα displacement between window frames raw).

Batches are padded to the longest example with ``mask = False`` (residues) and
``frame_mask = False`` (frames). Everything is deterministic
given the seed. ``residue_index`` counts residues from 0 within each chain, as
:mod:`openmm_starmd.protein` does at inference.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from openmm_starmd.data import BackboneShard, TrajectoryError, load_shard

__all__ = ["WindowSampler", "load_split", "fit_window", "restart_segments", "RESTART_MIN_DT_NS"]


def fit_window(coords_nm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Superpose every frame of a window on its first frame by the Cα of valid residues.

    Parameters
    ----------
    coords_nm : np.ndarray, shape (L, N, A, 3), nm
        Backbone atoms (A = 4: N, CA, C, O); atom 1 is Cα.
    mask : np.ndarray, shape (N,), bool
        Valid residues (the fit ignores the others, which move along).

    Returns
    -------
    np.ndarray, shape (L, N, A, 3), float32, nm
        Frame 0 unchanged; frame l rigidly moved to minimise its Cα RMSD to frame 0.
    """
    x = np.asarray(coords_nm, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if m.sum() < 3:
        return x.astype(np.float32)
    ca = x[:, m, 1]  # (L, n, 3)
    centre = ca.mean(axis=1)  # (L, 3)
    a = ca - centre[:, None]
    b = a[0]
    h = np.einsum("lni,nj->lij", a, b)  # covariance of each frame with frame 0
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.einsum("lij,ljk->lik", u, vt)))
    vt[:, 2, :] *= d[:, None]
    rot = np.einsum("lij,ljk->lik", u, vt)  # row-vector convention: a @ rot ~ b
    out = np.einsum("lnai,lij->lnaj", x - centre[:, None, None], rot) + centre[0]
    out[0] = x[0]
    return out.astype(np.float32)


def load_split(manifest_path: str, split: Optional[str] = None, verify: bool = True) -> list:
    """Load the shards of one split (``train``/``validation``/``test``; None = all) of a manifest."""
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest_path))
    shards = []
    for e in manifest["shards"]:
        if split is None or e["split"] == split:
            shards.append(load_shard(os.path.join(base, e["file"]), sha256=e["sha256"] if verify else None))
    if not shards:
        raise TrajectoryError(f"{manifest_path}: no shards in split {split!r}; run training/prepare.py or pick another split.")
    return shards


#: Windows with frames closer than this (ns) never span a reconstructed restart of a trajectory
#: (training/restore_md.py). training/junction_check.py on the first six restarts with frames
#: after them (2026-11-26 16:20, benchmarks/RESULTS.md): the 10-ps step across a restart sat at
#: the 85th-99th percentile of the trajectory's ordinary steps in five of six (0.3-0.7 Å larger),
#: the 0.1-ns step at the 36th-95th, the 1-ns step at the 18th-62nd (one of six at 98th): windows
#: at Δt >= 1 ns may span a restart.
RESTART_MIN_DT_NS = 1.0


def restart_segments(shard: BackboneShard) -> Optional[list]:
    """[(first, end), ...] frame ranges between the shard's reconstructed restarts (its
    provenance ``restarts``), or None when it has none."""
    cuts = sorted({int(r["frame"]) for r in shard.provenance.get("restarts", []) if 0 < int(r["frame"]) < shard.n_frames})
    if not cuts:
        return None
    bounds = [0] + cuts + [shard.n_frames]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class _Traj:
    shard: BackboneShard
    max_stride: int  # largest stride k with (L - 1) k <= F - 1
    segments: Optional[list] = None  # restart_segments(shard)


class WindowSampler:
    """Random training windows from backbone shards.

    Parameters
    ----------
    shards : sequence of BackboneShard
    window : int
        Frames per example L (≥ 2), the most an example has.
    min_window : int, optional
        The fewest frames an example may have (2 ≤ min_window ≤ window; None: ``window``, every
        example full). Smaller values let short trajectories serve larger Δt.
    dt_range_ns : (float, float)
        Range of the log-uniform Δt distribution, ns.
    max_residues : int, optional
        Residue budget; longer chains are cropped to a contiguous random window.
    seed : int
        Seed of the sampler's generator.
    restart_min_dt_ns : float
        Windows at Δt below this never span a reconstructed restart of a trajectory
        (:data:`RESTART_MIN_DT_NS`); they are drawn uniformly from the stretches between restarts.

    Raises
    ------
    TrajectoryError
        A shard has fewer frames than ``min_window``, or no shard supports any Δt in the range.
    """

    def __init__(self, shards: Sequence[BackboneShard], window: int, dt_range_ns=(0.01, 10.0),
                 max_residues: Optional[int] = None, seed: int = 0, fit: bool = True,
                 min_window: Optional[int] = None, restart_min_dt_ns: float = RESTART_MIN_DT_NS):
        if window < 2:
            raise ValueError(f"window={window}: a window needs at least 2 frames; pass window >= 2.")
        self.window = int(window)
        self.min_window = self.window if min_window is None else int(min_window)
        if not 2 <= self.min_window <= self.window:
            raise ValueError(f"min_window={min_window}: need 2 <= min_window <= window ({self.window}).")
        self.dt_min, self.dt_max = float(dt_range_ns[0]), float(dt_range_ns[1])
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_range_ns={dt_range_ns}: need 0 < min <= max.")
        self.max_residues = max_residues
        self.restart_min_dt_ns = float(restart_min_dt_ns)
        self.fit = bool(fit)
        self.rng = np.random.default_rng(seed)
        self.by_protein: dict[str, list[_Traj]] = {}
        for sh in shards:
            if sh.n_frames < self.min_window:
                raise TrajectoryError(
                    f"shard {sh.name!r} r{sh.replica}: {sh.n_frames} frames, fewer than the window of {self.min_window}; "
                    "use a shorter window or leave this trajectory out until it is longer.")
            k_max = (sh.n_frames - 1) // (self.min_window - 1)
            k_lo = max(1, math.ceil(self.dt_min / sh.frame_spacing_ns - 1e-9))
            # A trajectory whose spacing exceeds dt_max still serves its smallest stride.
            if k_lo > k_max:
                raise TrajectoryError(
                    f"shard {sh.name!r} r{sh.replica}: supports no Δt in [{self.dt_min}, {self.dt_max}] ns for a "
                    f"window of {self.min_window} (spacing {sh.frame_spacing_ns} ns, {sh.n_frames} frames); "
                    "use a shorter window or a longer trajectory.")
            self.by_protein.setdefault(sh.name, []).append(_Traj(sh, k_max, restart_segments(sh)))
        if not self.by_protein:
            raise TrajectoryError("WindowSampler got no shards; pass at least one BackboneShard.")
        self.proteins = sorted(self.by_protein)

    def dt_support_ns(self, shard: BackboneShard) -> tuple[float, float]:
        """The Δt interval (ns) this sampler can draw from ``shard``."""
        s = shard.frame_spacing_ns
        k_max = (shard.n_frames - 1) // (self.min_window - 1)
        lo = max(self.dt_min, s)
        return lo, max(lo, min(self.dt_max, k_max * s))

    def _draw_stride(self, t: _Traj) -> int:
        s = t.shard.frame_spacing_ns
        lo = max(self.dt_min, s)
        hi = max(lo, min(self.dt_max, t.max_stride * s))
        dt = math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
        return int(min(max(1, round(dt / s)), t.max_stride))

    def _within_segment(self, t: _Traj, k: int) -> tuple[int, int, int]:
        """(stride, start, frames) of a window at stride ≤ k inside one stretch between restarts,
        uniform over all such windows; k shrinks only if no stretch holds ``min_window`` frames."""
        longest = max(b - a for a, b in t.segments)
        k = max(1, min(k, (longest - 1) // (self.min_window - 1)))
        fits = []
        for a, b in t.segments:
            nf = min(self.window, (b - a - 1) // k + 1)
            if nf >= self.min_window:
                fits.append((a, nf, b - a - (nf - 1) * k))  # first frame, frames, number of starts
        if not fits:  # every stretch shorter than min_window frames: nothing restart-free exists
            n_frames = min(self.window, (t.shard.n_frames - 1) // k + 1)
            return k, int(self.rng.integers(t.shard.n_frames - (n_frames - 1) * k)), n_frames
        pick = int(self.rng.integers(sum(f[2] for f in fits)))
        for a, nf, n_starts in fits:
            if pick < n_starts:
                return k, a + pick, nf
            pick -= n_starts
        raise AssertionError("unreachable")

    def sample_one(self) -> dict:
        """One example: coords (L', N, 4, 3) nm with min_window ≤ L' ≤ window, aatype, residue/chain
        index, mask, dt_ns, names."""
        name = self.proteins[self.rng.integers(len(self.proteins))]
        trajs = self.by_protein[name]
        t = trajs[self.rng.integers(len(trajs))]
        sh = t.shard
        k = self._draw_stride(t)
        if t.segments is not None and k * sh.frame_spacing_ns < self.restart_min_dt_ns - 1e-9:
            k, start, n_frames = self._within_segment(t, k)
        else:
            n_frames = min(self.window, (sh.n_frames - 1) // k + 1)
            span = (n_frames - 1) * k
            start = int(self.rng.integers(sh.n_frames - span))
        frames = start + k * np.arange(n_frames)
        n = sh.n_residues
        r0, r1 = 0, n
        if self.max_residues is not None and n > self.max_residues:
            r0 = int(self.rng.integers(n - self.max_residues + 1))
            r1 = r0 + self.max_residues
        chain = sh.chain_index
        # 0-based position within each chain, computed on the full chain before cropping.
        pos = np.zeros(n, dtype=np.int64)
        for c in np.unique(chain):
            sel = np.where(chain == c)[0]
            pos[sel] = np.arange(sel.size)
        coords = sh.coords_nm[frames, r0:r1]
        if self.fit:
            coords = fit_window(coords, sh.residue_mask[r0:r1])
        return dict(
            coords_nm=coords,
            aatype=sh.aatype[r0:r1].astype(np.int64),
            residue_index=pos[r0:r1],
            chain_index=chain[r0:r1].astype(np.int64),
            mask=sh.residue_mask[r0:r1].copy(),
            dt_ns=np.float32(k * sh.frame_spacing_ns),
            start_time_ns=np.float32(sh.time_ns[start]),
            protein=name,
            replica=sh.replica,
        )

    def sample(self, batch_size: int, as_torch: bool = False) -> dict:
        """A padded batch.

        Returns
        -------
        dict
            ``coords_nm`` (B, L, N, 4, 3) float32 nm; ``frame_mask`` (B, L) bool (False: a padded
            frame, a copy of the example's last one); ``aatype``, ``residue_index``,
            ``chain_index`` (B, N) int64; ``mask`` (B, N) bool; ``dt_ns`` (B,) float32;
            ``start_time_ns`` (B,); ``protein`` list[str]; ``replica`` (B,) int64.
            Torch tensors when ``as_torch``.
        """
        items = [self.sample_one() for _ in range(batch_size)]
        n = max(it["coords_nm"].shape[1] for it in items)
        b, L = batch_size, self.window
        out = dict(
            coords_nm=np.zeros((b, L, n, 4, 3), np.float32),
            frame_mask=np.zeros((b, L), bool),
            aatype=np.full((b, n), 20, np.int64),
            residue_index=np.zeros((b, n), np.int64),
            chain_index=np.zeros((b, n), np.int64),
            mask=np.zeros((b, n), bool),
            dt_ns=np.array([it["dt_ns"] for it in items], np.float32),
            start_time_ns=np.array([it["start_time_ns"] for it in items], np.float32),
            replica=np.array([it["replica"] for it in items], np.int64),
        )
        for i, it in enumerate(items):
            f, m = it["coords_nm"].shape[:2]
            out["coords_nm"][i, :f, :m] = it["coords_nm"]
            out["coords_nm"][i, f:, :m] = it["coords_nm"][-1]
            out["frame_mask"][i, :f] = True
            for key in ("aatype", "residue_index", "chain_index", "mask"):
                out[key][i, :m] = it[key]
        if as_torch:
            import torch

            out = {k: torch.from_numpy(v) for k, v in out.items()}
        out["protein"] = [it["protein"] for it in items]
        return out

    def batches(self, batch_size: int, n_batches: int, as_torch: bool = False) -> Iterable[dict]:
        """``n_batches`` batches from this sampler's generator."""
        for _ in range(n_batches):
            yield self.sample(batch_size, as_torch=as_torch)
