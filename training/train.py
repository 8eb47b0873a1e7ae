#!/usr/bin/env python
"""Train STAR-MD on backbone shards: block-causal teacher forcing, contextual noise, DDP, exact resume.

Which part of STAR-MD: training. Every example is a window of L consecutive MD frames at a
spacing Δt ~ LogUniform[0.01, 10] ns (training/data.py). One pass of the network over the
2 L N tokens [clean frames 1..L, noisy frames 1..L] under the block-causal mask trains all L
autoregressive steps of the window at once (teacher forcing): noisy frame l sees the clean
frames before it and predicts its own clean version. Each noisy frame has its own diffusion time
t ~ U[t_min, 1]; the clean history is perturbed with contextual noise τ ~ U[0, context_tau_max]
through :func:`openmm_starmd.model.sequence.apply_contextual_noise`, the function the sampler
uses too; Δt of the window conditions every token through AdaLN. The loss is FrameDiff's
(training/losses.py).

Run it:

    python training/train.py --config training/configs/default.yaml
    torchrun --nproc_per_node=2 training/train.py --config ... --out runs/x     # DDP, gloo on CPU
    python training/train.py --resume auto --out runs/x                          # continue exactly
    python training/train.py --plot --out runs/x                                 # redraw loss.png

What a run writes to ``--out``: ``checkpoint.pt`` (model, optimiser, scheduler, EMA, step,
config, data position and every RNG state of every rank; loadable with
``torch.load(weights_only=True)``), ``log.csv`` (train and validation rows), ``loss.png`` and,
with ``--export``, a model file for :func:`openmm_starmd.checkpoints.load_model` holding the EMA
weights.

Choices where the paper is silent:

- Random draws per step, in a fixed order from one per-rank ``torch.Generator``: t (B, L),
  τ (B, L) -- drawn even with contextual noise off, so the ablation does not shift the stream --
  then the forward-process noise of the noisy frames, then the contextual noise. The window
  sampler has its own NumPy generator, identical on every rank.
- Exact resume: a checkpoint restores all of the above, so on CPU a resumed run computes the same
  losses, bit for bit, as an uninterrupted one with the same number of processes and threads.
  Changing the process count on resume is refused (each rank owns a generator); only options
  that steer the run rather than the maths (paths, intervals, ``--steps``, ...;
  ``RESUMABLE_CHANGES`` in training/config.py) may change.
- Non-finite loss or gradient: the run stops before the optimiser step, naming the step and the
  windows of the batch (protein, replica, start time, Δt); the last checkpoint stays as it was.
- Checkpoints are written to ``<name>.tmp`` and renamed, so a crash never leaves half a file, and
  replicas are checked to hold identical weights at every checkpoint of a DDP run.
- A SIGTERM/SIGUSR1 (a scheduler's pre-emption notice) ends the run within a step or two, on every
  rank at the same step, with a checkpoint, as does ``--stop-after N``; ``--resume auto``
  continues it.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from openmm_starmd.data import TrajectoryError
from openmm_starmd.diffusion import SE3Diffuser
from openmm_starmd.geometry.frames import frames_from_backbone
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.model import ResidueFeatures, StarMDNetwork, training_sequence

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    """Import training/<name>.py as ``starmd_training_<name>`` (training/ is a folder of scripts, not a
    package; the tests load these files under the same names, so both share one module object)."""
    key = f"starmd_training_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_config = _sibling("config")
_losses = _sibling("losses")
_windows = _sibling("data")
TrainConfig, ConfigError = _config.TrainConfig, _config.ConfigError
LossConfig, starmd_loss, LOSS_TERMS = _losses.LossConfig, _losses.starmd_loss, _losses.LOSS_TERMS
WindowSampler = _windows.WindowSampler

__all__ = [
    "TrainConfig", "Trainer", "train", "main", "CheckpointError", "NonFiniteLossError", "NoWindowError",
    "load_training_checkpoint", "window_inputs", "noised_sequence", "plot_log",
]

CHECKPOINT_FORMAT = "openmm-starmd-training"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"
PLOT_NAME = "loss.png"
LOG_COLUMNS = ("step", "split", "loss", *LOSS_TERMS, "lr", "grad_norm", "windows_per_s", "tokens_per_s", "elapsed_s")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file, the problem and the fix."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the message names the step and the batch."""


class NoWindowError(TrajectoryError):
    """No trajectory of a split can serve a window of the requested length and Δt range."""


# ============================================================================ distributed
@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device, init the group.

    gloo on CPU, nccl on CUDA; a single process needs no environment and starts no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"option device={cfg.device!r} asks for CUDA but no GPU is visible; use --device cpu.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def _all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _all_gather(obj, info: DistInfo) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ============================================================================ data
def read_manifest(path: str) -> dict:
    """The manifest of training/prepare.py, with clear errors for a missing, unreadable or empty one."""
    if not os.path.exists(path):
        raise TrajectoryError(f"manifest {path} does not exist; run training/prepare.py to build the shards, "
                              "or pass --manifest.")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise TrajectoryError(f"manifest {path} is not readable JSON ({exc}); rebuild it with training/prepare.py.") from exc
    if not isinstance(manifest, dict) or not manifest.get("shards"):
        raise TrajectoryError(f"manifest {path} lists no shards; run training/prepare.py after some MD has been "
                              "checkpointed, or pass another --manifest.")
    return manifest


def load_split_shards(cfg: TrainConfig, manifest: dict, split: str, log=print) -> tuple[list, list]:
    """Shards of one split that can serve windows of ``cfg.shortest_window`` frames or more in the Δt range.

    Returns
    -------
    shards : list of BackboneShard
    entries : list of dict
        Their manifest entries (protein, replica, sha256, ...), same order.

    Raises
    ------
    TrajectoryError
        A shard is missing or its sha256 differs from the manifest.
    NoWindowError
        No shard of the split can serve a window (the error says the longest trajectory and how
        to fix it).
    """
    entries = [e for e in manifest["shards"] if e.get("split") == split]
    if not entries:
        raise TrajectoryError(f"manifest {cfg.manifest} has no shards in split {split!r}; pick another split or add "
                              "proteins to it in training/plan.json and rerun training/prepare.py.")
    base = os.path.dirname(os.path.abspath(cfg.manifest))
    from openmm_starmd.data import load_shard

    kept, kept_entries, dropped = [], [], []
    for e in entries:
        shard = load_shard(os.path.join(base, e["file"]), sha256=e["sha256"] if cfg.verify_sha256 else None)
        try:
            WindowSampler([shard], cfg.window, (cfg.dt_min_ns, cfg.dt_max_ns), min_window=cfg.shortest_window)
        except TrajectoryError as exc:
            dropped.append((shard, str(exc)))
            continue
        kept.append(shard)
        kept_entries.append(e)
    if not kept:
        longest = max(s.n_frames for s, _ in dropped)
        flag = "--min-window" if cfg.shortest_window < cfg.window else "--window"
        raise NoWindowError(
            f"windows of {cfg.shortest_window} frames at Δt in [{cfg.dt_min_ns}, {cfg.dt_max_ns}] ns fit no trajectory of "
            f"split {split!r} in {cfg.manifest} (the longest has {longest} frames); use {flag} "
            f"{max(2, min(longest, cfg.shortest_window - 1))} or less, widen --dt-min-ns/--dt-max-ns, or simulate longer.")
    for shard, why in dropped:
        log(f"note: left out of split {split!r}: {why}")
    return kept, kept_entries


def take_rows(batch: dict, rows) -> dict:
    """Rows of a padded window batch, trimmed to the residues and frames any of them uses."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {k: (v[rows] if isinstance(v, np.ndarray) else [v[i] for i in rows]) for k, v in batch.items()}
    used = np.flatnonzero(out["mask"].any(0))
    n = int(used[-1]) + 1 if used.size else 1
    f = out["coords_nm"].shape[1]
    if "frame_mask" in out:
        used_frames = np.flatnonzero(out["frame_mask"].any(0))
        f = int(used_frames[-1]) + 1 if used_frames.size else 1
        out["frame_mask"] = out["frame_mask"][:, :f]
    out["coords_nm"] = out["coords_nm"][:, :f, :n]
    for key in ("aatype", "residue_index", "chain_index", "mask"):
        out[key] = out[key][:, :n]
    return out


class RankBatches:
    """This rank's share of each global batch: every rank draws the same global batch of windows from
    one seeded sampler and keeps rows rank, rank + W, ... (a DistributedSampler-style split)."""

    def __init__(self, shards, cfg: TrainConfig, info: DistInfo):
        if cfg.batch_size % info.world:
            raise ConfigError(f"option batch_size={cfg.batch_size} is not divisible by the {info.world} processes; "
                              f"use a multiple of {info.world}.")
        self.sampler = WindowSampler(shards, cfg.window, (cfg.dt_min_ns, cfg.dt_max_ns), cfg.max_residues, seed=cfg.seed,
                                     min_window=cfg.shortest_window)
        self.batch_size = cfg.batch_size
        self.rows = np.arange(info.rank, cfg.batch_size, info.world)
        self.windows_drawn = 0

    def next(self) -> dict:
        batch = self.sampler.sample(self.batch_size)
        self.windows_drawn += self.batch_size
        return take_rows(batch, self.rows)

    def state_dict(self) -> dict:
        return {"sampler_rng": json.dumps(self.sampler.rng.bit_generator.state), "windows_drawn": self.windows_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        self.windows_drawn = int(state["windows_drawn"])


# ============================================================================ one training pass
def window_inputs(batch: dict, device, dtype=torch.float32):
    """Model inputs of a window batch.

    Parameters
    ----------
    batch : dict
        From :class:`training/data.py WindowSampler` (``coords_nm`` (B, L, N, 4, 3) nm, ``aatype``,
        ``residue_index``, ``chain_index``, ``mask`` (B, N), ``dt_ns`` (B,) ns).

    Returns
    -------
    clean : Rigid, batch shape (B, L, N), nm
        Residue frames from N, CA, C.
    residues : ResidueFeatures, (B, N)
    dt_ns : torch.Tensor, shape (B,), float64, ns
    """
    coords = torch.as_tensor(np.asarray(batch["coords_nm"]), device=device, dtype=dtype)
    mask = torch.as_tensor(np.asarray(batch["mask"]), device=device, dtype=torch.bool)
    frame_mask = mask[:, None].expand(coords.shape[:3])
    clean = frames_from_backbone(coords[..., 0, :], coords[..., 1, :], coords[..., 2, :], mask=frame_mask)
    residues = ResidueFeatures.build(np.asarray(batch["aatype"]), np.asarray(batch["residue_index"]),
                                     np.asarray(batch["chain_index"]), mask, device=device)
    dt_ns = torch.as_tensor(np.asarray(batch["dt_ns"]), dtype=torch.float64, device=device)
    return clean, residues, dt_ns


def noised_sequence(diffuser, clean: Rigid, residues: ResidueFeatures, dt_ns: torch.Tensor,
                    generator: torch.Generator, contextual_noise: bool, t_sampling: str = "uniform"):
    """Draw t and τ and build the block-causal [clean 1..L, noisy 1..L] sequence of a window batch.

    Parameters
    ----------
    diffuser : SE3Diffuser
    clean : Rigid, batch shape (B, L, N), nm
    residues : ResidueFeatures, (B, N)
    dt_ns : torch.Tensor, shape (B,), ns
        Fed to every token's AdaLN conditioning.
    generator : torch.Generator
        Draw order: t, τ, forward noise, contextual noise.
    contextual_noise : bool
        False: the history is the clean data and τ = 0 (the ablation); τ is drawn anyway.
    t_sampling : {"uniform", "loguniform"}
        Distribution of t on [t_min, 1]; both use one uniform draw per frame.

    Returns
    -------
    sequence : TokenSequence, 2 L slots
    targets : DiffusionTargets
    """
    B, L = clean.trans.shape[:2]
    dtype, device = clean.trans.dtype, clean.trans.device
    t_min = diffuser.config.t_min
    u = torch.rand(B, L, generator=generator, dtype=dtype, device=device)
    if t_sampling == "loguniform":
        t = t_min * (1.0 / t_min) ** u
    elif t_sampling == "uniform":
        t = t_min + (1.0 - t_min) * u
    else:
        raise ValueError(f"t_sampling={t_sampling!r}; use 'uniform' or 'loguniform'.")
    tau = diffuser.sample_context_tau((B, L), generator=generator, dtype=dtype, device=device)
    return training_sequence(diffuser, clean, residues.mask, t, dt_ns, tau=tau if contextual_noise else None,
                             generator=generator)


def _autocast(cfg: TrainConfig, device: torch.device):
    on = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if on else nullcontext()


def batch_loss(model, diffuser, loss_cfg: LossConfig, batch: dict, generator, cfg: TrainConfig, device, dtype) -> dict:
    """Loss terms of one window batch (one block-causal pass); see training/losses.py."""
    clean, residues, dt_ns = window_inputs(batch, device, dtype)
    sequence, targets = noised_sequence(diffuser, clean, residues, dt_ns, generator, cfg.contextual_noise,
                                        cfg.t_sampling)
    L = clean.trans.shape[1]
    with _autocast(cfg, device):
        out = model(residues, sequence)
    pred = Rigid(out.rots[:, L:].to(dtype), out.trans[:, L:].to(dtype))
    frame_mask = batch.get("frame_mask")
    if frame_mask is not None:
        frame_mask = torch.as_tensor(np.asarray(frame_mask), device=device, dtype=torch.bool)
    return starmd_loss(diffuser, pred, targets, residues.mask, residues.chain_index, loss_cfg, frame_mask=frame_mask)


def _describe_windows(batch: dict) -> list[str]:
    return [f"{p} r{int(r)} from {float(t0):.3f} ns at Δt {float(dt):.4g} ns"
            for p, r, t0, dt in zip(batch["protein"], batch["replica"], batch["start_time_ns"], batch["dt_ns"])]


# ============================================================================ optimiser, schedule, EMA
def build_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (biases and norms are not decayed)."""
    decay = [p for p in net.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in net.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based) as a fraction of ``cfg.lr``: linear warm-up,
    then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a network's weights, in a shadow copy of the network.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) over the first updates n.
    """

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.shadow.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.shadow.buffers(), net.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.shadow.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


# ============================================================================ RNG states
def _rng_state(generator: torch.Generator) -> dict:
    """Every random state of this process, as tensors and JSON strings (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *[float(x) if i == 2 else int(x) for i, x in enumerate(np_state[2:])]]),
        "python": json.dumps(random.getstate(), default=list),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    key, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((key, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


# ============================================================================ checkpoints
def _atomic_torch_save(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_training_checkpoint(path) -> dict:
    """Read a training checkpoint safely (``torch.load(weights_only=True)``: no code can run).

    Returns the payload with ``config`` parsed back into a :class:`TrainConfig`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --resume PATH of a checkpoint.pt, or start "
                              "without --resume.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types
        raise CheckpointError(f"checkpoint {path} could not be read safely ({str(exc).splitlines()[0]}); it is "
                              "truncated, foreign or holds objects other than tensors and plain data.") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint (no '{CHECKPOINT_FORMAT}' marker); model files "
                              "from --export are for openmm_starmd.checkpoints.load_model, resume needs <out>/checkpoint.pt.")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('format_version')!r}, this script "
                              f"resumes version {CHECKPOINT_VERSION}; use the openmm-starmd version that wrote it.")
    payload["config"] = TrainConfig.from_dict(json.loads(payload["config"]), where=f"checkpoint {path}")
    return payload


def check_resumable(saved: TrainConfig, wanted: TrainConfig, path) -> None:
    """Raise :class:`CheckpointError` if ``wanted`` differs from the checkpoint's config in an option that
    changes what training computes (anything outside ``RESUMABLE_CHANGES``)."""
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in a if k not in _config.RESUMABLE_CHANGES and a[k] != b[k]]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a[k]!r} vs now {b[k]!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} was made with an incompatible config ({shown}); resume without "
                              "those options (the checkpoint's config is used), or start a new run with another --out.")


def _fingerprint(entries: list) -> list:
    return sorted([e["protein"], int(e["replica"]), e["sha256"]] for e in entries)


# ============================================================================ logging
class CsvLog:
    """Append-only CSV of train and validation rows (rank 0)."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        rows = []
        if keep_until_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= keep_until_step]
        # a resumed run rewrites the rows after its checkpoint, which the interrupted run may have logged
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fh.flush()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def plot_log(csv_path, png_path) -> Path:
    """Draw the loss curves of a log.csv: total loss (train, validation) and the train terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path = Path(csv_path), Path(png_path)
    if not csv_path.exists():
        raise FileNotFoundError(f"{csv_path} does not exist; train first (or pass the --out of a run) before --plot.")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def series(split, key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r["split"] == split and r.get(key, "") not in ("", "nan")]
        return zip(*pts) if pts else ((), ())

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        x, y = series(split, "loss")
        if x:
            ax0.plot(x, y, style, label=split, ms=3)
    ax0.set(xlabel="step", ylabel="loss", yscale="log", title="total loss")
    for key in LOSS_TERMS:
        x, y = series("train", key)
        if x:
            ax1.plot(x, y, label=key)
    ax1.set(xlabel="step", ylabel="unweighted term", yscale="log", title="train loss terms")
    for ax in (ax0, ax1):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# ============================================================================ the trainer
class Trainer:
    """One training run (one process of it under DDP).

    Parameters
    ----------
    cfg : TrainConfig
        With ``cfg.resume`` set, the checkpoint's state is restored; ``cfg`` must then agree with the
        checkpoint's config outside ``RESUMABLE_CHANGES``.
    log : callable
        Where rank 0's notes go (default ``print``).

    Attributes
    ----------
    step : int
        Optimiser steps done.
    history : list of (int, float)
        (step, global train loss) of every step of this invocation.
    val_history : list of (int, float)
        (step, validation loss) of every validation of this invocation.
    net : StarMDNetwork
        The trained network (not the DDP wrapper); ``ema.shadow`` holds the EMA weights.
    """

    def __init__(self, cfg: TrainConfig, log=print):
        self.info = setup_distributed(cfg)
        self._log = log if self.info.is_main else (lambda *a, **k: None)
        self.cfg = cfg
        self.out = Path(cfg.out)
        torch.set_num_threads(cfg.threads)
        resume = None
        if cfg.resume:
            path = self.out / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
            resume = load_training_checkpoint(path)
            check_resumable(resume["config"], cfg, path)
            if int(resume["world_size"]) != self.info.world:
                raise CheckpointError(f"checkpoint {path} was written by {resume['world_size']} processes, this run has "
                                      f"{self.info.world}; resume with --nproc_per_node={resume['world_size']} (each "
                                      "process restores its own random state).")
            self.resume_path = path
        elif (self.out / CHECKPOINT_NAME).exists():
            raise CheckpointError(f"{self.out / CHECKPOINT_NAME} already exists; pass --resume auto to continue that run, "
                                  "or choose a new --out.")
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        # ---- data
        manifest = read_manifest(cfg.manifest)
        train_shards, train_entries = load_split_shards(cfg, manifest, cfg.train_split, self._log)
        self.data_fingerprint = _fingerprint(train_entries)
        self.train_proteins = sorted({e["protein"] for e in train_entries})
        #: the trajectories trained on, for the model's metadata (its card's "data" line)
        self.train_data = sorted(({"protein": e["protein"], "replica": int(e.get("replica", 0)), "frames": sh.n_frames,
                                   "spacing_ns": float(sh.frame_spacing_ns), "total_ns": float(sh.total_ns),
                                   "sha256": e["sha256"]} for sh, e in zip(train_shards, train_entries)),
                                 key=lambda d: (d["protein"], d["replica"]))
        self.batches = RankBatches(train_shards, cfg, self.info)
        supports = [self.batches.sampler.dt_support_ns(s) for s in train_shards]
        #: the Δt range the training windows really covered (ns), recorded in exported models
        self.trained_dt_ns = [min(lo for lo, _ in supports), max(hi for _, hi in supports)]
        self.val_batches = self._validation_windows(manifest)

        # ---- model, diffusion, loss, optimiser
        self.model_config = cfg.model_config()
        self.diffusion_config = cfg.diffusion_config()
        try:
            self.loss_config = LossConfig(**cfg.loss)
        except TypeError as exc:
            raise ConfigError(f"the loss options {cfg.loss} are invalid ({exc}); see LossConfig in training/losses.py.") from exc
        self.diffuser = SE3Diffuser(self.diffusion_config)
        self.dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.net = StarMDNetwork(self.model_config, self.diffusion_config).to(device=self.info.device, dtype=self.dtype)
        self.ema = EMA(self.net, cfg.ema_decay)
        self.optimizer = build_optimizer(self.net, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.generator = torch.Generator(device=self.info.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + 7919 * self.info.rank + 1)
        np.random.seed((cfg.seed + 1009 * self.info.rank) % 2**32)
        random.seed(cfg.seed + 1009 * self.info.rank)
        self.step = 0
        self.last_checkpoint_step = None
        if resume is not None:
            self._restore(resume)
        self.model = self.net
        if self.info.active:
            self.model = torch.nn.parallel.DistributedDataParallel(self.net)
        self.history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self._stop_local = False  # set by request_stop (a signal handler) on this rank
        self._stop_all = False  # any rank asked, as agreed in the last step's reduction
        self.csv = CsvLog(self.out / LOG_NAME, self.step if resume is not None else None) if self.info.is_main else None

    # ---------------------------------------------------------------- setup helpers
    def _validation_windows(self, manifest: dict) -> list[dict]:
        cfg = self.cfg
        if not cfg.val_split or not any(e.get("split") == cfg.val_split for e in manifest["shards"]):
            self._log(f"note: no shards in split {cfg.val_split!r}; the validation loss is not computed.")
            return []
        try:
            shards, _ = load_split_shards(cfg, manifest, cfg.val_split, self._log)
        except NoWindowError as exc:
            self._log(f"note: {exc} The validation loss is not computed.")
            return []
        # a fixed set of windows, so every validation of the run sees the same ones
        sampler = WindowSampler(shards, cfg.window, (cfg.dt_min_ns, cfg.dt_max_ns), cfg.max_residues, seed=cfg.seed + 1,
                                min_window=cfg.shortest_window)
        full = sampler.sample(cfg.val_windows)
        mine = np.arange(self.info.rank, cfg.val_windows, self.info.world)
        per = max(1, cfg.batch_size // self.info.world)
        return [take_rows(full, mine[i:i + per]) for i in range(0, len(mine), per)]

    def _restore(self, ckpt: dict) -> None:
        cfg = self.cfg
        if ckpt["data"]["shards"] != json.dumps(self.data_fingerprint) and not cfg.allow_data_change:
            raise CheckpointError(f"the training shards of {cfg.manifest} differ from those checkpoint {self.resume_path} "
                                  "was trained on; resume with the same data, or pass --allow-data-change to continue "
                                  "on the new data.")
        try:
            self.net.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {self.resume_path} does not fit the network of its own config "
                                  f"({str(exc).splitlines()[0]}); it was written by an incompatible openmm-starmd version.") from exc
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.batches.load_state_dict(ckpt["data"])
        _set_rng_state(ckpt["rng"][self.info.rank], self.generator)
        self.step = int(ckpt["step"])
        self.last_checkpoint_step = self.step
        self._log(f"resumed {self.resume_path} at step {self.step}")

    # ---------------------------------------------------------------- checkpoints
    def _check_replicas(self) -> None:
        """DDP keeps replicas equal by construction; a cheap check catches anything that breaks that."""
        if not self.info.active:
            return
        with torch.no_grad():
            sums = torch.stack([p.double().sum() for p in self.net.parameters()]).cpu()
        gathered = _all_gather(sums, self.info)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"DDP replicas hold different weights at step {self.step}; this is a bug, please "
                               "report it with the run's config.")

    def save_checkpoint(self) -> Path:
        """Write ``<out>/checkpoint.pt`` (rank 0; every rank takes part to hand over its RNG state)."""
        self._check_replicas()
        rng = _all_gather(_rng_state(self.generator), self.info)
        path = self.out / CHECKPOINT_NAME
        if self.info.is_main:
            cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}
            payload = {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "config": json.dumps(self.cfg.to_dict()),
                "step": self.step,
                "world_size": self.info.world,
                "model": cpu(self.net.state_dict()),
                "ema": {"weights": cpu(self.ema.shadow.state_dict()), "updates": self.ema.updates},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": {**self.batches.state_dict(), "shards": json.dumps(self.data_fingerprint)},
                "coverage": json.dumps(self.coverage()),
                "rng": [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in rng],
            }
            _atomic_torch_save(payload, path)
        if self.info.active:
            dist.barrier()
        self.last_checkpoint_step = self.step
        return path

    def coverage(self) -> dict:
        """What the model was trained on, stored in checkpoints (``coverage``) and exported models'
        metadata alike: training proteins, the Δt range (ns) their windows covered, every trajectory."""
        return {"train_proteins": self.train_proteins, "trained_dt_ns": self.trained_dt_ns, "train_data": self.train_data}

    def export(self, path) -> Path:
        """Save the EMA weights as a model file for :func:`openmm_starmd.checkpoints.load_model` (rank 0)."""
        from openmm_starmd.checkpoints import save_model
        from openmm_starmd.sampling import SamplingConfig

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.diffusion_config
        metadata = {
            "weights": "ema", "ema_decay": self.cfg.ema_decay, "steps": self.step, "total_steps": self.cfg.steps,
            "val_loss": self.val_history[-1][1] if self.val_history else None, **self.coverage(),
            "train_config": self.cfg.to_dict(),
        }
        shadow = copy.deepcopy(self.ema.shadow).cpu()
        return save_model(path, shadow, d, SamplingConfig(t_min=d.t_min, context_tau_max=d.context_tau_max), metadata)

    # ---------------------------------------------------------------- steps
    def request_stop(self) -> None:
        """End soon (after this step or the next), with a checkpoint; signal handlers call this.

        Under DDP the request travels with the next step's reduction, so every rank stops at the
        same step."""
        self._stop_local = True

    def _nonfinite(self, what: str, value: float, batch: dict, bad_here: bool) -> NonFiniteLossError:
        reports = _all_gather((self.info.rank, bad_here, _describe_windows(batch)), self.info)
        windows = "; ".join(w for _, _, ws in reports for w in ws)
        ranks = [r for r, bad, _ in reports if bad]
        where = f" (non-finite on rank(s) {ranks})" if self.info.active else ""
        last = (f"the last good checkpoint is {self.out / CHECKPOINT_NAME} (step {self.last_checkpoint_step})"
                if self.last_checkpoint_step is not None else "no checkpoint was written yet")
        return NonFiniteLossError(
            f"{what} became {value} at step {self.step + 1} (batch {self.step + 1} of the run{where}: {windows}); "
            f"training stopped before the update and {last}; lower --lr, or inspect those windows.")

    def train_step(self) -> dict:
        """One optimiser step on the next global batch; returns the global (all-rank) loss terms."""
        cfg = self.cfg
        batch = self.batches.next()
        self.net.train()
        terms = batch_loss(self.model, self.diffuser, self.loss_config, batch, self.generator, cfg,
                           self.info.device, self.dtype)
        loss = terms["loss"]
        n_tokens = 2.0 * float((np.asarray(batch["mask"])[:, None] & np.asarray(batch["frame_mask"])[:, :, None]).sum())
        # one reduction per step: loss x its frame weight, the weight, every term with its count,
        # tokens, stop flag
        weight = terms["frame_weight"].detach().double()
        parts = [loss.detach().double() * weight, weight]
        for k in LOSS_TERMS:
            v = terms[k].detach().double()
            ok = torch.isfinite(v)
            parts += [torch.where(ok, v, torch.zeros_like(v)), ok.double()]
        parts += [loss.new_tensor(n_tokens, dtype=torch.float64), loss.new_tensor(float(self._stop_local), dtype=torch.float64)]
        packed = _all_reduce_sum(torch.stack(parts), self.info).cpu()
        global_loss = float(packed[0] / packed[1])
        if not math.isfinite(global_loss):
            raise self._nonfinite("the loss", global_loss, batch, not bool(torch.isfinite(loss)))
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients; weighting each process's frame mean by its share
        # of the frames makes that the gradient of the global frame mean, whatever the window
        # lengths on each process (the factor is exactly 1 for one process)
        share = float(weight * self.info.world / packed[1])
        (loss * share if share != 1.0 else loss).backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            raise self._nonfinite("the gradient norm", grad_norm, batch, True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net)
        self.step += 1
        self._stop_all = bool(packed[-1] > 0)
        out = {"loss": global_loss, "lr": lr, "grad_norm": grad_norm, "tokens": float(packed[-2])}
        for i, k in enumerate(LOSS_TERMS):
            s, c = float(packed[2 + 2 * i]), float(packed[3 + 2 * i])
            out[k] = s / c if c > 0 else float("nan")
        self.history.append((self.step, global_loss))
        return out

    @torch.no_grad()
    def validate(self) -> float | None:
        """Validation loss of the EMA weights on the fixed validation windows (None without validation data)."""
        if self.cfg.val_every == 0:
            return None
        g = torch.Generator(device=self.info.device)
        g.manual_seed(self.cfg.seed * 1_000_003 + 7919 * self.info.rank + 2)
        net = self.ema.shadow
        sums = torch.zeros(2 + 2 * len(LOSS_TERMS), dtype=torch.float64)
        for batch in self.val_batches:
            terms = batch_loss(net, self.diffuser, self.loss_config, batch, g, self.cfg, self.info.device, self.dtype)
            n = float(terms["frame_weight"])  # batches of unequal frame counts combine exactly
            sums[0] += n * float(terms["loss"])
            sums[1] += n
            for i, k in enumerate(LOSS_TERMS):
                v = float(terms[k])
                if math.isfinite(v):
                    sums[2 + 2 * i] += n * v
                    sums[3 + 2 * i] += n
        sums = _all_reduce_sum(sums.to(self.info.device), self.info).cpu()
        if sums[1] == 0:
            return None
        row = {"loss": float(sums[0] / sums[1])}
        for i, k in enumerate(LOSS_TERMS):
            row[k] = float(sums[2 + 2 * i] / sums[3 + 2 * i]) if sums[3 + 2 * i] > 0 else float("nan")
        self.val_history.append((self.step, row["loss"]))
        if self.csv is not None:
            self.csv.write({"step": self.step, "split": "val", **row})
        return row["loss"]

    def fit(self) -> "Trainer":
        """Train until ``cfg.steps`` (or ``stop_after`` steps of this invocation, or a stop request)."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.info.is_main and cfg.progress),
                   dynamic_ncols=True, desc="train")
        start_step, t0 = self.step, time.perf_counter()
        acc, acc_n, acc_tokens, last_t = {}, 0, 0.0, time.perf_counter()
        try:
            while self.step < cfg.steps:
                r = self.train_step()
                bar.update(1)
                acc_n += 1
                acc_tokens += r["tokens"]
                for k in ("loss", *LOSS_TERMS):
                    if math.isfinite(r[k]):
                        s, c = acc.get(k, (0.0, 0))
                        acc[k] = (s + r[k], c + 1)
                stop = self._stop_all or (cfg.stop_after is not None and self.step - start_step >= cfg.stop_after)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or stop:
                    now = time.perf_counter()
                    row = {k: (acc[k][0] / acc[k][1] if k in acc else float("nan")) for k in ("loss", *LOSS_TERMS)}
                    row.update(step=self.step, split="train", lr=r["lr"], grad_norm=r["grad_norm"],
                               windows_per_s=acc_n * cfg.batch_size / (now - last_t),
                               tokens_per_s=acc_tokens / (now - last_t), elapsed_s=now - t0)
                    if self.csv is not None:
                        self.csv.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{r['lr']:.2e}")
                    acc, acc_n, acc_tokens, last_t = {}, 0, 0.0, now
                if cfg.val_every and self.step % cfg.val_every == 0:
                    v = self.validate()
                    if v is not None and self.info.is_main and cfg.progress:
                        bar.write(f"step {self.step}: validation loss {v:.4g}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop:
                    self.save_checkpoint()
                if stop:
                    self._log(f"stopped at step {self.step} with a checkpoint; continue with --resume auto --out {self.out}")
                    break
        finally:
            bar.close()
            if self.csv is not None:
                self.csv.close()
        if self.info.is_main:
            try:
                plot_log(self.out / LOG_NAME, self.out / PLOT_NAME)
            except ImportError:  # pragma: no cover - matplotlib is a dependency
                pass
            if cfg.export and self.step >= cfg.steps:
                self._log(f"exported the EMA weights to {self.export(cfg.export)}")
            elif cfg.export:  # a stopped run must not leave a half-trained model where the finished one goes
                self._log(f"not exported to {cfg.export}: stopped at step {self.step} of {cfg.steps}; "
                          f"`python training/export.py {self.out / CHECKPOINT_NAME} MODEL.pt` exports it as it is")
        if self.info.active:
            dist.barrier()
        return self


def train(cfg: TrainConfig, log=print) -> Trainer:
    """Run (or resume) training as configured; returns the finished :class:`Trainer`."""
    return Trainer(cfg, log=log).fit()


# ============================================================================ command line
def _config_from_command_line(argv):
    cfg, args, given = _config.parse_args(argv, description=__doc__.split("\n\n")[0])
    if cfg.resume and not args.plot:
        # options not given explicitly come from the checkpoint, so `--resume auto --out X` is enough
        path = Path(cfg.out) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
        saved = load_training_checkpoint(path)["config"].to_dict()
        saved.update({k: v for k, v in cfg.to_dict().items() if k in given or k in ("resume", "stop_after")})
        cfg = TrainConfig.from_dict(saved)
    return cfg, args


def main(argv=None) -> int:
    try:
        cfg, args = _config_from_command_line(argv)
        if args.plot:
            print(plot_log(Path(cfg.out) / LOG_NAME, Path(cfg.out) / PLOT_NAME))
            return 0
        trainer = Trainer(cfg)
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, lambda *_: trainer.request_stop())
        trainer.fit()
    except (ConfigError, TrajectoryError, CheckpointError, NonFiniteLossError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
