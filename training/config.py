"""Configuration of a STAR-MD training run: one dataclass, YAML file and command line.

Which part of STAR-MD: the training hyper-parameters (window L, Δt range, contextual noise,
optimiser, schedule, EMA) and the ablation switches of the paper's study (separable attention,
fixed Δt, no contextual noise), gathered in :class:`TrainConfig`. Everything is plain JSON-able
data, stored inside every checkpoint, so a checkpoint alone says how it was made.

Precedence: the dataclass defaults, then a YAML file (``--config``), then command-line flags.
The network is a named size of :func:`openmm_starmd.model.model_config` (``model_size``) with
field overrides (``model``), plus the four fields that training owns (``window``, ``attention``,
``fixed_dt_ns``, ``contextual_noise``); the diffusion schedule is
:class:`openmm_starmd.diffusion.DiffusionConfig` with overrides (``diffusion``); the loss is
:class:`LossConfig` (training/losses.py) with overrides (``loss``).

Choices where the paper is silent (documented defaults):

- AdamW (β = 0.9, 0.999; weight decay 0.01 on matrices and embeddings only, as nanoGPT), peak
  learning rate 1e-4 (FrameDiff's), linear warm-up over 1000 steps, cosine decay to 10 % of the
  peak at ``steps``; gradient clipping at norm 1.0; EMA of the weights with decay 0.999
  (warmed up as min(decay, (1 + n) / (10 + n)) so early EMA weights are not dominated by the
  random initialisation).
- ``batch_size`` counts windows per optimiser step over all processes (the global batch); each
  of W processes takes every W-th window of it, so the data a run sees does not depend on W.
- ``max_residues`` 256: longer chains are cropped to a contiguous window of residues.
- ``min_window`` 4: an example has L frames where the trajectory allows it at the drawn Δt, and
  down to 4 otherwise (padded, its padding outside the loss), so that few-ns trajectories still
  train Δt near 1 ns, the integrator's default; the paper's 100-ns ATLAS runs always fill L = 8.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "ConfigError", "parse_args", "RESUMABLE_CHANGES", "TRAINING_OWNED_MODEL_FIELDS"]

HERE = os.path.dirname(os.path.abspath(__file__))

#: Fields that may differ between a checkpoint and the run that resumes it (they do not change
#: what the next optimiser step computes, except ``steps``, which stretches the cosine schedule,
#: and ``device``/``threads``, which change rounding only).
RESUMABLE_CHANGES = frozenset({
    "out", "steps", "log_every", "val_every", "val_windows", "ckpt_every", "progress", "export", "resume",
    "threads", "device", "manifest", "allow_data_change", "stop_after",
})

#: ModelConfig fields set by TrainConfig's own flags, never through ``model`` overrides.
TRAINING_OWNED_MODEL_FIELDS = ("window", "attention", "fixed_dt_ns", "contextual_noise")


class ConfigError(ValueError):
    """A bad configuration value; the message names the option, the problem and the fix."""


def _f(default, help: str, type=None, choices=None, section: str = "run", **kw):
    meta = dict(help=help, type=type, choices=choices, section=section)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Every setting of a training run; see ``python training/train.py --help``."""

    # ---------------------------------------------------------------- data
    manifest: str = _f(os.path.join(HERE, "data", "manifest.json"),
                       "manifest.json written by training/prepare.py", str, section="data")
    train_split: str = _f("train", "manifest split trained on", str, section="data")
    val_split: str = _f("validation", "manifest split for the validation loss ('' or a split without "
                        "shards: no validation)", str, section="data")
    dt_min_ns: float = _f(0.01, "smallest Δt of the log-uniform window spacing, ns", float, section="data")
    dt_max_ns: float = _f(10.0, "largest Δt of the log-uniform window spacing, ns", float, section="data")
    max_residues: int | None = _f(256, "crop longer chains to this many contiguous residues (0: no crop)", int,
                                  section="data")
    verify_sha256: bool = _f(True, "check every shard's sha256 against the manifest", section="data")
    allow_data_change: bool = _f(False, "on --resume, accept training shards that differ from the checkpoint's "
                                 "(e.g. trajectories that grew)", section="data")
    # ---------------------------------------------------------------- model
    model_size: str = _f("default", "named network size of openmm_starmd.model.model_config", str,
                         choices=("default", "paper"), section="model")
    model: dict = _f({}, "ModelConfig field overrides, KEY=VALUE (repeatable), e.g. --model width=64", section="model")
    window: int = _f(8, "training window L: frames per example, trained in one block-causal pass", int,
                     section="model")
    min_window: int = _f(4, "fewest frames of an example: a trajectory too short for L frames at a large Δt serves "
                         "that Δt with fewer (4 ns at 10 ps frames: Δt up to 1.33 ns instead of 0.57 ns at L = 8); "
                         "set it to --window for full windows only", int, section="data")
    attention: str = _f("joint", "joint spatio-temporal attention, or the separable ablation", str,
                        choices=("joint", "separable"), section="model")
    fixed_dt_ns: float | None = _f(None, "ablation: condition on this Δt (ns) whatever the window's Δt is", float,
                                   section="model")
    contextual_noise: bool = _f(True, "perturb the clean history with τ ~ U[0, context_tau_max] "
                                "(--no-contextual-noise: ablation)", section="model")
    diffusion: dict = _f({}, "DiffusionConfig overrides, KEY=VALUE (repeatable), e.g. --diffusion context_tau_max=0.05",
                         section="model")
    # ---------------------------------------------------------------- loss
    loss: dict = _f({}, "LossConfig overrides (training/losses.py), KEY=VALUE (repeatable), e.g. --loss fape_weight=0.5",
                    section="loss")
    t_sampling: str = _f("uniform", "per-frame diffusion time t: uniform on [t_min, 1] (FrameDiff, the paper) or "
                         "loguniform on [t_min, 1] (15%% instead of 1%% of frames below t = 0.02, where the fine "
                         "chain geometry is learnt)", str, choices=("uniform", "loguniform"), section="loss")
    # ---------------------------------------------------------------- optimisation
    batch_size: int = _f(8, "windows per optimiser step, over all processes", int, section="optim")
    steps: int = _f(100_000, "optimiser steps of the whole run (the cosine schedule ends here)", int, section="optim")
    lr: float = _f(1e-4, "peak learning rate of AdamW", float, section="optim")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr", float, section="optim")
    warmup_steps: int = _f(1000, "linear warm-up steps", int, section="optim")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices and embeddings only)", float, section="optim")
    beta1: float = _f(0.9, "AdamW beta1", float, section="optim")
    beta2: float = _f(0.999, "AdamW beta2", float, section="optim")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)", float, section="optim")
    ema_decay: float = _f(0.999, "decay of the exponential moving average of the weights", float, section="optim")
    # ---------------------------------------------------------------- run
    out: str = _f(os.path.join(HERE, "runs", "default"), "run directory: checkpoint.pt, log.csv, loss.png", str)
    seed: int = _f(0, "seed of the window sampler and of every random draw", int)
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (the local GPU under torchrun, else cpu)", str)
    amp: str = _f("auto", "bf16 autocast of the linear layers: auto (on for CUDA), bf16, off", str,
                  choices=("auto", "bf16", "off"))
    dtype: str = _f("float32", "parameter dtype", str, choices=("float32", "float64"))
    threads: int = _f(1, "torch CPU threads per process", int)
    log_every: int = _f(10, "write a train row to log.csv every this many steps", int)
    val_every: int = _f(500, "validation loss every this many steps (0: never)", int)
    val_windows: int = _f(32, "validation windows (fixed seed, so every validation sees the same ones)", int)
    ckpt_every: int = _f(500, "checkpoint every this many steps (and always at the end)", int)
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    export: str | None = _f(None, "at the end, save the EMA weights with openmm_starmd.checkpoints.save_model here",
                            str)
    resume: str | None = _f(None, "continue from a checkpoint (path, or 'auto' for <out>/checkpoint.pt)", str)
    stop_after: int | None = _f(None, "end this invocation after this many steps, with a checkpoint (for time-limited "
                                "jobs; --resume auto continues)", int)

    def __post_init__(self):
        checks = [
            ("window", self.window >= 2, "a window needs at least 2 frames"),
            ("min_window", self.min_window >= 2, "a window needs at least 2 frames"),
            ("batch_size", self.batch_size >= 1, "use at least 1 window per step"),
            ("steps", self.steps >= 1, "train at least 1 step"),
            ("lr", self.lr > 0, "the learning rate must be positive"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "use a fraction in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, "use 0 for no warm-up"),
            ("grad_clip", self.grad_clip >= 0, "use 0 for no clipping"),
            ("ema_decay", 0 <= self.ema_decay < 1, "use a decay in [0, 1)"),
            ("dt_min_ns", 0 < self.dt_min_ns <= self.dt_max_ns, "need 0 < dt_min_ns <= dt_max_ns"),
            ("threads", self.threads >= 1, "use at least 1 thread"),
            ("log_every", self.log_every >= 1, "use a positive interval"),
            ("ckpt_every", self.ckpt_every >= 1, "use a positive interval"),
            ("val_every", self.val_every >= 0, "use 0 to switch validation off"),
            ("val_windows", self.val_windows >= 1, "use at least 1 window"),
            ("max_residues", self.max_residues is None or self.max_residues >= 0, "use 0 for no cropping"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, "stop after at least 1 step"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise ConfigError(f"option {name}={getattr(self, name)!r} is out of range; {fix}.")
        for name in ("model_size", "attention", "amp", "dtype"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(f"option {name}={getattr(self, name)!r} is not one of {choices}; pick one of those.")
        owned = sorted(set(self.model) & set(TRAINING_OWNED_MODEL_FIELDS))
        if owned:
            raise ConfigError(f"model overrides {owned} are training options; set them with --{owned[0].replace('_', '-')} "
                              "(or the top-level YAML key) instead.")
        if self.max_residues == 0:
            self.max_residues = None

    @property
    def shortest_window(self) -> int:
        """The fewest frames a training example may have: ``min(min_window, window)``."""
        return min(self.min_window, self.window)

    # ---------------------------------------------------------------- conversions
    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so that typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where} has unknown option(s) {unknown}; valid options are listed by "
                              "`python training/train.py --help`.")
        return cls(**d)

    def model_config(self):
        """The :class:`openmm_starmd.model.ModelConfig` of this run."""
        from openmm_starmd.model import model_config

        try:
            return model_config(self.model_size, **self.model, window=self.window, attention=self.attention,
                                fixed_dt_ns=self.fixed_dt_ns, contextual_noise=self.contextual_noise)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the model options give an invalid ModelConfig ({exc}); fix --model/--window.") from exc

    def diffusion_config(self):
        """The :class:`openmm_starmd.diffusion.DiffusionConfig` of this run."""
        from openmm_starmd.diffusion import DiffusionConfig

        try:
            return DiffusionConfig.from_dict(dict(self.diffusion))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the diffusion options are invalid ({exc}); fix --diffusion.") from exc


# -------------------------------------------------------------------- command line
def _parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'null' -> None, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class _KeyValue(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string} expects KEY=VALUE, got {item!r}; e.g. {option_string} width=64.")
            key, value = item.split("=", 1)
            current[key.strip()] = _parse_value(value)
        setattr(namespace, self.dest, current)


_SECTIONS = {"data": "data", "model": "model and ablations", "loss": "loss", "optim": "optimisation", "run": "run"}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The argparse parser: one flag per :class:`TrainConfig` field, plus --config and --plot."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config YAML < flags. Single process: python training/train.py ...; "
               "several: torchrun --nproc_per_node=N training/train.py ... (see training/TRAINING.md).",
    )
    p.add_argument("--config", help="YAML file of options (keys as the flags, with _ for -); flags override it")
    p.add_argument("--plot", action="store_true",
                   help="only redraw <out>/loss.png from <out>/log.csv and exit (the PNG is also written at the end of training)")
    groups = {k: p.add_argument_group(v) for k, v in _SECTIONS.items()}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{meta['help']} (default: {default!r})"
        g = groups[meta["section"]]
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, dict):
            g.add_argument(flag, nargs="+", action=_KeyValue, metavar="KEY=VALUE", default=argparse.SUPPRESS,
                           help=help_text)
        else:
            g.add_argument(flag, type=meta["type"], choices=meta["choices"], default=argparse.SUPPRESS, help=help_text)
    return p


def load_yaml(path: str) -> dict:
    """Options from a YAML file (a mapping of option names)."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(f"--config {path} needs PyYAML; pip install pyyaml, or pass the options as flags.") from exc
    if not os.path.exists(path):
        raise ConfigError(f"--config {path} does not exist; pass an existing YAML file (see training/configs/).")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds a {type(data).__name__}, not a mapping of options; write `key: value` lines.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_args(argv=None, description: str = "") -> tuple[TrainConfig, argparse.Namespace, set]:
    """Parse the command line into a :class:`TrainConfig`.

    Returns
    -------
    config : TrainConfig
    args : argparse.Namespace
        The raw namespace (for ``--plot``).
    given : set of str
        Option names set explicitly by --config or flags (resume checks them against the checkpoint).
    """
    parser = build_parser(description)
    args = parser.parse_args(argv)
    options = load_yaml(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "plot")}
    for key in ("model", "diffusion", "loss"):
        if key in flags and key in options:  # flags refine the YAML's mapping instead of replacing it
            flags[key] = {**options[key], **flags[key]}
    options.update(flags)
    config = TrainConfig.from_dict(options, where=args.config or "the command line")
    return config, args, set(options)
