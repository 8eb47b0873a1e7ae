"""Autoregressive STAR-MD rollout with a KV cache. Knows nothing of OpenMM: tensors in nm.

Which part of STAR-MD: inference. Each new frame is drawn by reverse SE(3) diffusion from the
prior, every reverse step being one pass of the network over the N noisy tokens of the new frame
attending to the KV cache of the clean history; the finished frame is perturbed with contextual
noise exactly as in training and its clean tokens are appended to the cache.

Choices where the paper is silent:

- Time grid: ``steps`` network passes at t_k = t_min + (1 - t_min)(1 - k/(steps - 1))², i.e.
  quadratically denser towards t_min (:func:`time_grid`); between passes one Euler–Maruyama step
  (or probability-flow Euler step with ``ode=True``) of the diffuser from t_k to t_{k+1}; the frame
  returned is the network's x0 prediction at t_min (FrameDiff's choice: the rotation process never
  reaches sigma = 0, so the last prediction is the clean frame). Why quadratic: an MD frame given
  its history is a *narrow* distribution (Cα spread ~0.05-0.3 nm), resolved only at small t. With
  an exact (oracle) x0 for a Gaussian target of spread s, 20 SDE steps on a uniform grid give
  samples 3.5x too broad at s = 0.05 nm (1.1x at 0.3 nm); on the quadratic grid 0.9x and 1.07x,
  within ~20% of the converged 200-step values (0.75x and 0.99x; below 1 because the output is the
  posterior mean at t_min = 0.01, where the noise is still 0.045 nm: t_min = 0.001 gives 0.99x).
- Coordinates: the diffusion runs relative to the Cα centroid of the previous clean frame, and
  contextual noise about each frame's own centroid; both are defined in
  :mod:`openmm_starmd.model.sequence`, shared with training.
- Contextual noise: τ ~ U[0, context_tau_max] per replica and frame, for given history frames and
  generated ones alike, if the model was trained with it (``ModelConfig.contextual_noise``);
  ``context_tau_max = 0`` switches it off (no perturbation at all, τ = 0 in the conditioning).
- One ``torch.Generator`` drives every random draw, in a fixed order, so a seed reproduces a
  rollout bit for bit on CPU, and replica b's draws do not depend on the other replicas' contents.
- Default ``steps = 20``: the compact "default" model then generates a frame at N = 60 residues
  within the 0.5 s budget on 2 CPU cores (benchmarks/sampler_speed.py), and on the quadratic grid
  20 steps are within ~20% of converged in the oracle study above (50 steps: within ~5%). Raise
  it for quality-critical runs; it is a sampling-time knob.

Exact resume: :meth:`AutoregressiveSampler.state_dict` stores the frames the cache was built from
(as the model saw them, i.e. after contextual noise), their τ, the last frame before contextual
noise (the x0 anchor of ``ModelConfig.x0_anchor = "previous"``), the diffusion origin, the
attention origin and the generator state. A window cache's keys depend, through the layers, on
up to ``W + (layers - 1)(W - 1)`` earlier frames, so that many are stored; replaying them rebuilds
the last W frames' keys and values bit for bit. A full cache stores every frame.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ._config import JsonConfig
from .geometry.ca_constraints import build_ca_constraints, project_ca
from .geometry.pair_bounds import check_pairs, clamp_pair_distances
from .geometry.rigid import Rigid
from .model.network import StarMDNetwork
from .model.sequence import ResidueFeatures, apply_contextual_noise, ca_centroid, shift_frames

__all__ = ["SamplingConfig", "AutoregressiveSampler", "time_grid"]

_STATE_VERSION = 1


def time_grid(steps: int, t_min: float) -> list[float]:
    """Diffusion times of the network passes for one frame, from 1 down to ``t_min``.

    t_k = t_min + (1 - t_min)(1 - k / (steps - 1))², k = 0..steps-1 (a single step is t_min).

    Returns
    -------
    list of float, length ``steps``, decreasing
    """
    if steps == 1:
        return [float(t_min)]
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    return (t_min + (1.0 - t_min) * (1.0 - u) ** 2).tolist()


@dataclass
class SamplingConfig(JsonConfig):
    """How frames are drawn.

    Attributes
    ----------
    steps : int
        Network passes (reverse-diffusion steps) per generated frame.
    ode : bool
        Probability-flow ODE instead of the reverse SDE (Euler–Maruyama).
    noise_scale : float
        Multiplies the noise injected by each SDE step (1 = the exact reverse SDE).
    t_min : float
        Diffusion time of the last network pass, whose x0 prediction is the new frame.
    context_tau_max : float
        Contextual noise level: τ ~ U[0, context_tau_max] on every history frame (0 disables).
    cache_mode : {"window", "full"}
        Sliding-window cache (memory O(W N), the model's training regime) or the whole history
        (memory O(L N)).
    window : int or None
        Sliding window in frames (history frames a new frame attends to); None uses the model's
        training context ``ModelConfig.context_frames`` = L - 1, the most history any frame of a
        training window of L frames sees.
    """

    steps: int = 20
    ode: bool = False
    noise_scale: float = 1.0
    t_min: float = 0.01
    context_tau_max: float = 0.1
    cache_mode: str = "window"
    window: int | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"steps={self.steps!r} must be an integer >= 1"),
            (self.noise_scale >= 0, f"noise_scale={self.noise_scale} must be >= 0"),
            (0 < self.t_min < 1, f"t_min={self.t_min} must lie in (0, 1)"),
            (0 <= self.context_tau_max <= 1, f"context_tau_max={self.context_tau_max} must lie in [0, 1]"),
            (self.cache_mode in ("window", "full"), f"cache_mode={self.cache_mode!r} must be 'window' or 'full'"),
            (self.window is None or (isinstance(self.window, int) and self.window >= 1),
             f"window={self.window!r} must be a positive number of frames or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingConfig: {message}.")


class AutoregressiveSampler:
    """Generate MD frames autoregressively with a trained STAR-MD network.

    Parameters
    ----------
    model : StarMDNetwork
        Moved to ``device``/``dtype`` in place and put in eval mode.
    diffuser : SE3Diffuser
    aatype, residue_index, chain_index : array-like, shape (N,), integer
        Residue types (AlphaFold order, 20 = unknown), residue numbers, 0-based chain indices.
    mask : array-like, shape (N,), bool, or None
        False for missing residues (their frames are carried along but never attended to).
    dt_ns : float
        Physical time between consecutive frames, ns.
    config : SamplingConfig, optional
    n_replicas : int
        B independent rollouts, batched in every network pass.
    seed : int, optional
        Seed of the generator; None draws one from the OS (see :attr:`seed`).
    device : str or torch.device
    dtype : torch.dtype
        float32 or float64.
    autocast : bool
        Run the network's linear layers under bf16 autocast (meant for CUDA); geometry stays in
        ``dtype``.
    pair_bounds : (pairs, d_min_nm, d_max_nm), optional
        Residue pairs (P, 2), disjoint, whose Cα–Cα distance every generated frame keeps within
        [d_min, d_max] nm (scalars or (P,)), by moving the two residues rigidly along their Cα–Cα
        line before the frame becomes history (:mod:`openmm_starmd.geometry.pair_bounds`; the
        integrator passes the protein's disulfides, :data:`openmm_starmd.protein.DISULFIDE_CA_RANGE_NM`).
    ca_geometry : bool
        Project every generated frame's Cα trace into the bounds MD keeps (chain links 3.6–4.1 Å,
        non-neighbours >= 3.5 Å, and the ``pair_bounds``), by moving residues rigidly, before it
        becomes history (:mod:`openmm_starmd.geometry.ca_constraints`; gaps and cis peptides are
        read from the first history frame). Default False: the model's own frames.
    """

    def __init__(
        self,
        model: StarMDNetwork,
        diffuser,
        aatype,
        residue_index,
        chain_index,
        mask,
        dt_ns: float,
        config: SamplingConfig | None = None,
        n_replicas: int = 1,
        seed: int | None = None,
        device="cpu",
        dtype=torch.float32,
        autocast: bool = False,
        pair_bounds=None,
        ca_geometry: bool = False,
    ):
        if not float(dt_ns) > 0:
            raise ValueError(f"dt_ns={dt_ns} must be a positive frame spacing in ns, e.g. 0.1.")
        if int(n_replicas) < 1:
            raise ValueError(f"n_replicas={n_replicas} must be at least 1.")
        self.config = config if config is not None else SamplingConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.diffuser = diffuser
        self.dt_ns = float(dt_ns)
        self.n_replicas = int(n_replicas)
        self.autocast = bool(autocast)
        self.residues = ResidueFeatures.build(aatype, residue_index, chain_index, mask, batch=self.n_replicas, device=self.device)
        if self.residues.aatype.dim() != 2 or self.residues.shape[0] != self.n_replicas:
            raise ValueError("aatype, residue_index, chain_index and mask must be per-residue arrays of shape (N,).")
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else int(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.window = self.config.window or self.model.config.context_frames
        self.pair_bounds = None
        if pair_bounds is not None and len(pair_bounds[0]):
            self.pair_bounds = check_pairs(pair_bounds[0], self.n_residues, pair_bounds[1], pair_bounds[2])
        self.ca_geometry = bool(ca_geometry)
        self._ca_constraints = None  # built from the first history frame
        self._ca_reference = None  # (N, 3) Cα of that frame, nm
        #: Statistics of the Cα projection (``ca_geometry``): frames it moved, frames it left with a
        #: bound still violated by more than its tolerance after its last sweep (only frames far
        #: outside what any trained model makes, e.g. an untrained network's), and the largest
        #: violation it found and the largest move it made, nm.
        self.ca_projection = {"frames": 0, "moved": 0, "unconverged": 0, "max_violation_nm": 0.0, "max_move_nm": 0.0}
        self._use_context_noise = self.model.config.contextual_noise and self.config.context_tau_max > 0
        self._reset(start_frame=0, attention_origin=None)

    # ------------------------------------------------------------------ bookkeeping
    def _reset(self, start_frame: int, attention_origin: torch.Tensor | None) -> None:
        mode = self.config.cache_mode
        self._rollout = self.model.start_rollout(
            self.residues, self.dt_ns, mode=mode, window=self.window if mode == "window" else None,
            origin=attention_origin, start_frame=start_frame,
        )
        self._history: list[tuple[Rigid, torch.Tensor]] = []  # (frames as seen by the model, tau)
        self._origin: torch.Tensor | None = None  # Cα centroid of the last clean frame, (B, 3)

    @property
    def n_frames(self) -> int:
        """History frames seen so far (given with :meth:`add_history` plus generated)."""
        return self._rollout.n_frames

    @property
    def n_residues(self) -> int:
        """N."""
        return self.residues.shape[1]

    def _history_needed(self) -> int | None:
        """Frames needed to rebuild the cache exactly; None = all (full cache)."""
        if self.config.cache_mode == "full":
            return None
        W, layers = self.window, len(self.model.layers)
        return W + (layers - 1) * (W - 1)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _as_batch(self, frames: Rigid, what: str) -> Rigid:
        rots = torch.as_tensor(frames.rots, dtype=self.dtype, device=self.device)
        trans = torch.as_tensor(frames.trans, dtype=self.dtype, device=self.device)
        B, N = self.n_replicas, self.n_residues
        if trans.shape == (N, 3) and rots.shape == (N, 3, 3):
            rots, trans = rots.expand(B, N, 3, 3), trans.expand(B, N, 3)
        if trans.shape != (B, N, 3) or rots.shape != (B, N, 3, 3):
            raise ValueError(
                f"{what} have rots {tuple(rots.shape)} and trans {tuple(trans.shape)}; expected (N, 3, 3) and (N, 3) "
                f"or (B, N, 3, 3) and (B, N, 3) with N={N} residues and B={B} replicas."
            )
        return Rigid(rots, trans)

    def _append(self, clean: Rigid) -> None:
        """Contextual noise, cache update, and the record needed to resume."""
        mask = self.residues.mask
        B = self.n_replicas
        if self._use_context_noise:
            tau = torch.rand((B,), generator=self.generator, dtype=self.dtype, device=self.device)
            tau = tau * self.config.context_tau_max
            seen = apply_contextual_noise(self.diffuser, clean, tau, mask, generator=self.generator)
        else:
            tau = torch.zeros(B, dtype=self.dtype, device=self.device)
            seen = clean
        with torch.no_grad(), self._autocast():
            self.model.append_clean(self._rollout, seen, tau, anchor=clean)
        self._history.append((seen, tau))
        keep = self._history_needed()
        if keep is not None and len(self._history) > keep:
            del self._history[: len(self._history) - keep]
        self._origin = ca_centroid(clean, mask)

    # ------------------------------------------------------------------ public API
    def add_history(self, frames: Rigid) -> None:
        """Append clean frames as context (contextual noise applied, KV cache updated).

        Parameters
        ----------
        frames : Rigid, batch shape (N,) or (B, N), nm
            One frame per call; an (N,) frame is given to every replica.
        """
        frames = self._as_batch(frames, "history frames")
        if not bool((self._finite(frames) | ~self.residues.mask).all()):
            raise ValueError("history frames contain NaN or Inf at valid residues; pass finite frames in nm.")
        frames = self._placeholders(frames)
        if self.ca_geometry and self._ca_constraints is None:
            self._set_ca_reference(frames.trans[0])
        self._append(frames)

    def _set_ca_reference(self, ca_nm: torch.Tensor) -> None:
        self._ca_reference = ca_nm.detach().to(torch.float64).cpu()
        extra = (None, None, None) if self.pair_bounds is None else self.pair_bounds
        r = self.residues
        c = build_ca_constraints(r.residue_index[0].cpu(), r.chain_index[0].cpu(), r.mask[0].cpu(), self._ca_reference,
                                 *extra)
        for name in ("pairs", "lo", "hi", "min_nonbonded"):
            setattr(c, name, getattr(c, name).to(self.device))
        self._ca_constraints = c

    def _constrain(self, x0: Rigid) -> Rigid:
        """The Cα projection (``ca_geometry``; it holds the disulfides too), then the exact disulfide
        clamp, so the disulfide bounds hold even where the projection stopped short of convergence."""
        if self._ca_constraints is None:
            return x0 if self.pair_bounds is None else clamp_pair_distances(x0, *self.pair_bounds)
        trans, info = project_ca(x0.trans, self._ca_constraints)
        if self.pair_bounds is not None:
            trans = clamp_pair_distances(Rigid(x0.rots, trans), *self.pair_bounds).trans
        stats = self.ca_projection
        stats["frames"] += 1
        stats["moved"] += int(info["max_move_nm"] > 0)
        stats["unconverged"] += int(info["violation_after_nm"] > self._ca_constraints.tol_nm)
        stats["max_violation_nm"] = max(stats["max_violation_nm"], info["violation_before_nm"])
        stats["max_move_nm"] = max(stats["max_move_nm"], info["max_move_nm"])
        return Rigid(x0.rots, trans)

    @staticmethod
    def _finite(frames: Rigid) -> torch.Tensor:
        """(B, N) bool: frame finite."""
        return torch.isfinite(frames.trans).all(-1) & torch.isfinite(frames.rots).flatten(-2).all(-1)

    def _placeholders(self, frames: Rigid) -> Rigid:
        """Missing residues -> identity rotation at the valid Cα centroid, so no NaN enters any
        arithmetic (contextual noise, diffusion, the stored state)."""
        m = self.residues.mask
        if bool(m.all()):
            return frames
        centre = ca_centroid(frames, m)
        eye = torch.eye(3, dtype=self.dtype, device=self.device)
        return Rigid(torch.where(m[..., None, None], frames.rots, eye), torch.where(m[..., None], frames.trans, centre[:, None]))

    def _sample_frame(self, label: str) -> Rigid:
        cfg, B, N = self.config, self.n_replicas, self.n_residues
        times = time_grid(cfg.steps, cfg.t_min)
        origin = self._origin
        x = self.diffuser.sample_prior((B, N), generator=self.generator, dtype=self.dtype, device=self.device)
        for k, t in enumerate(times):
            with torch.no_grad(), self._autocast():
                x0 = self.model.denoise(self._rollout, shift_frames(x, -origin), t)
            bad = ~self._finite(x0) & self.residues.mask
            if bool(bad.any()):
                replicas = sorted({int(b) for b in torch.nonzero(bad)[:, 0]})
                raise FloatingPointError(
                    f"{label} has NaN/Inf in replicas {replicas} (reverse step {k + 1} of {cfg.steps}, t={t:.3g}) and was "
                    "not appended; check the checkpoint, dt_ns and the starting structure, or lower noise_scale."
                )
            if k == len(times) - 1:
                return self._placeholders(x0)
            x = self.diffuser.reverse_step(
                x, shift_frames(x0, origin), t, t - times[k + 1],
                noise_scale=cfg.noise_scale, ode=cfg.ode, generator=self.generator,
            )
        raise AssertionError("unreachable")

    def generate(self, n_frames: int, progress: bool = False, return_raw: bool = False):
        """Generate frames; each one is also appended as history.

        Parameters
        ----------
        n_frames : int
        progress : bool
            Show a tqdm progress bar.
        return_raw : bool
            Also return the network's frames as drawn, before the disulfide bounds and the Cα
            projection (identical to the frames when neither is on).

        Returns
        -------
        Rigid, batch shape (B, n_frames, N), nm
            Missing residues (mask False) get placeholder frames: identity rotation at the Cα
            centroid. With ``return_raw``, a pair (frames, raw frames).

        Raises
        ------
        FloatingPointError
            A generated frame contains NaN/Inf at a valid residue; it is not appended.
        """
        if self.n_frames == 0 or self._origin is None:
            raise RuntimeError("the sampler has no history; call add_history(frames) with at least one starting frame first.")
        from tqdm.auto import tqdm

        kept, raw = [], []
        for i in tqdm(range(int(n_frames)), disable=not progress, desc="STAR-MD frames", unit="frame"):
            x0 = self._sample_frame(f"generated frame {i + 1} of {n_frames} (rollout frame {self.n_frames})")
            raw.append(x0)
            x0 = self._constrain(x0)
            self._append(x0)
            kept.append(x0)

        def stacked(frames):
            if not frames:
                B, N = self.n_replicas, self.n_residues
                return Rigid(torch.empty(B, 0, N, 3, 3, dtype=self.dtype, device=self.device),
                             torch.empty(B, 0, N, 3, dtype=self.dtype, device=self.device))
            return Rigid(torch.stack([f.rots for f in frames], 1), torch.stack([f.trans for f in frames], 1))

        return (stacked(kept), stacked(raw)) if return_raw else stacked(kept)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Plain data (numpy arrays, ints, floats, str) from which :meth:`load_state_dict` resumes exactly."""
        def arr(x):
            return x.detach().cpu().numpy().copy()

        n_hist = len(self._history)
        B, N = self.n_replicas, self.n_residues
        empty = np.zeros((0, B, N, 3, 3)), np.zeros((0, B, N, 3)), np.zeros((0, B))
        return {
            "version": _STATE_VERSION,
            "n_frames": self.n_frames,
            "first_history_frame": self.n_frames - n_hist,
            "history_rots": arr(torch.stack([h[0].rots for h in self._history])) if n_hist else empty[0],
            "history_trans": arr(torch.stack([h[0].trans for h in self._history])) if n_hist else empty[1],
            "history_tau": arr(torch.stack([h[1] for h in self._history])) if n_hist else empty[2],
            "diffusion_origin": None if self._origin is None else arr(self._origin),
            # the rollout keeps the last clean frames before contextual noise (the x0 anchor), (K, B, N, ...)
            "anchor_rots": arr(torch.stack([a.rots for a in self._rollout.anchors])) if self._rollout.anchors else None,
            "anchor_trans": arr(torch.stack([a.trans for a in self._rollout.anchors])) if self._rollout.anchors else None,
            "attention_origin": None if self._rollout.origin is None else arr(self._rollout.origin),
            "rng_state": arr(self.generator.get_state()),
            "seed": self.seed,
            "n_replicas": B,
            "n_residues": N,
            "dt_ns": self.dt_ns,
            "dtype": str(self.dtype).replace("torch.", ""),
            "sampling_config": self.config.to_dict(),
            "ca_reference": None if self._ca_reference is None else self._ca_reference.numpy().copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the cache and RNG from :meth:`state_dict`; the rollout then continues exactly.

        The sampler must have been built with the same model, residues, replicas, dtype and
        sampling config as the one that wrote ``state``.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state has version {state.get('version')!r}; this code reads version {_STATE_VERSION}.")
        mine = {"n_replicas": self.n_replicas, "n_residues": self.n_residues, "dt_ns": self.dt_ns,
                "dtype": str(self.dtype).replace("torch.", ""), "sampling_config": self.config.to_dict()}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {value!r}; build the sampler as the saved one was built.")

        def tensor(x):
            return torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)

        att = state["attention_origin"]
        self._reset(int(state["first_history_frame"]), None if att is None else tensor(att))
        rots, trans, taus = tensor(state["history_rots"]), tensor(state["history_trans"]), tensor(state["history_tau"])
        with torch.no_grad(), self._autocast():
            for i in range(rots.shape[0]):
                seen = Rigid(rots[i], trans[i])
                self.model.append_clean(self._rollout, seen, taus[i])
                self._history.append((seen, taus[i]))
        if state.get("anchor_rots") is not None:
            a_rots, a_trans = tensor(state["anchor_rots"]), tensor(state["anchor_trans"])
            if a_rots.dim() == 4:  # written when the rollout kept one anchor frame: (B, N, 3, 3)
                a_rots, a_trans = a_rots[None], a_trans[None]
            dtype = self.model.dtype
            self._rollout.anchors = [Rigid(r.to(dtype), t.to(dtype)) for r, t in zip(a_rots, a_trans)]
            self._rollout.anchor = self._rollout.anchors[-1]
        if self.n_frames != int(state["n_frames"]):
            raise ValueError(f"sampler state is inconsistent: rebuilt {self.n_frames} frames, expected {state['n_frames']}.")
        origin = state["diffusion_origin"]
        self._origin = None if origin is None else tensor(origin)
        saved = state.get("ca_reference") is not None
        if self.ca_geometry != saved:
            raise ValueError(f"the saved rollout was made with ca_geometry={saved} and this sampler has "
                             f"ca_geometry={self.ca_geometry}; build it with ca_geometry={saved} "
                             f"(StarMDIntegrator: keep_ca_geometry={saved}) to continue it exactly.")
        if saved:
            self._set_ca_reference(torch.as_tensor(np.asarray(state["ca_reference"])))
        self.seed = int(state["seed"])
        self.generator.set_state(torch.as_tensor(np.asarray(state["rng_state"], dtype=np.uint8)))
