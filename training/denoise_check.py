#!/usr/bin/env python
"""One-shot denoising error of a model at fixed diffusion times, next to trivial estimators.

Rollouts fail when each generated frame's consecutive Cα–Cα distances are off by more than the
0.39 Å between MD's 3.80 Å and the 4.19 Å break threshold. This check asks where that error comes
from, without any rollout: on fixed windows of a split (fitted, as in training), every frame f ≥ 1
is noised to a chosen t, the model predicts x0 in one block-causal pass (clean history with the
default contextual noise), and the prediction is compared with the true frame. Printed next to it:

- ``anchor``: the model's anchor without the network: the mean of the last H clean frames, H =
  ``--anchor-frames`` (default: the model's ``anchor_frames``; H = 1 is "no motion");
- ``previous``: "no motion", the previous clean frame (what ``x0_anchor="previous"`` starts from
  with H = 1);
- ``noisy``: the noisy input itself, x_t (what ``x0_anchor="noisy"`` starts from);
- ``posterior``: the Gaussian posterior mean of the Cα given x_t and a prior N(anchor, s² I) with
  s = ``--prior-nm``: anchor + c (x_t − o − α (anchor − o)), c = α s² / (α² s² + σ²), with o the
  diffusion origin (the previous frame's Cα centroid) and α, σ of the VP schedule at t.

Columns (means over windows, frames f ≥ 1 and valid residues): Cα RMSE (Å, no superposition; the
windows are fitted on their first frame), mean |d_pred − d_true| of consecutive Cα (Å), and the
fraction of consecutive pairs beyond 4.19 Å.

Example::

    python training/denoise_check.py openmm_starmd/data/starmd_default.pt --split validation --t 0.01 0.05 0.1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from openmm_starmd.analysis.validity import CA_BREAK_NM  # noqa: E402
from openmm_starmd.checkpoints import load_model  # noqa: E402
from openmm_starmd.model.anchor import posterior_mean_trans  # noqa: E402
from openmm_starmd.model.sequence import ca_centroid, training_sequence  # noqa: E402


def _sibling(name: str):
    """training/<name>.py as ``starmd_training_<name>`` (the name train.py and the tests use)."""
    key = f"starmd_training_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(HERE, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_data = _sibling("data")
WindowSampler, load_split = _data.WindowSampler, _data.load_split
window_inputs = _sibling("train").window_inputs

DEFAULT_MANIFEST = os.path.join(HERE, "data", "manifest.json")
ESTIMATORS = ("model", "anchor", "previous", "noisy", "posterior")


#: The posterior mean of the Cα, shared with the network's "posterior" anchor.
posterior_mean_ca = posterior_mean_trans


def _bond_stats(pred: torch.Tensor, true: torch.Tensor, bonded: torch.Tensor) -> tuple[float, float]:
    d_pred = (pred[..., 1:, :] - pred[..., :-1, :]).norm(dim=-1)
    d_true = (true[..., 1:, :] - true[..., :-1, :]).norm(dim=-1)
    b = bonded.expand_as(d_pred)
    return float((d_pred - d_true).abs()[b].mean() * 10), float((d_pred[b] > CA_BREAK_NM).float().mean())


def history_mean_ca(ca_nm: torch.Tensor, frames: int) -> torch.Tensor:
    """Mean Cα of the last ``frames`` frames before each frame f >= 1: (B, L, N, 3) -> (B, L - 1, N, 3)."""
    L = ca_nm.shape[1]
    return torch.stack([ca_nm[:, max(0, f - frames):f].mean(1) for f in range(1, L)], 1)


@torch.no_grad()
def check(loaded, windows: dict, t: float, prior_nm: float, seed: int, anchor_frames: int | None = None) -> dict:
    """Errors of the estimators at diffusion time ``t`` on a batch of windows; ``anchor_frames``
    defaults to the model's."""
    model, diffuser = loaded.model, loaded.diffuser
    clean, residues, dt_ns = window_inputs(windows, "cpu", next(model.parameters()).dtype)
    B, L, N = clean.trans.shape[:3]
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((B, L), float(t), dtype=clean.trans.dtype)
    tau = diffuser.sample_context_tau((B, L), generator=g, dtype=clean.trans.dtype)
    if not loaded.model_config.contextual_noise:
        tau = None
    sequence, _ = training_sequence(diffuser, clean, residues.mask, tt, dt_ns, tau=tau, generator=g)
    out = model(residues, sequence)
    true = clean.trans[:, 1:]
    previous = clean.trans[:, :-1]
    anchor = history_mean_ca(clean.trans, anchor_frames or loaded.model_config.anchor_frames)
    noisy = sequence.frames.trans[:, L + 1:]
    pred = out.trans[:, L + 1:]
    r3 = diffuser.r3
    tq = torch.tensor(float(t), dtype=torch.float64)
    alpha = float(r3.mean_coef(tq))
    sigma = float(torch.sqrt(r3.variance(tq))) * diffuser.config.coordinate_scale_nm
    origin = ca_centroid(clean, residues.mask[:, None])[:, :-1]
    post = posterior_mean_ca(noisy, anchor, origin, alpha, sigma, prior_nm)
    mask = residues.mask[:, None, :].expand(B, L - 1, N)
    ri, ci = residues.residue_index, residues.chain_index
    bonded = ((ri[:, 1:] - ri[:, :-1] == 1) & (ci[:, 1:] == ci[:, :-1]) & residues.mask[:, 1:] & residues.mask[:, :-1])
    bonded = bonded[:, None, :]
    row = {"t": float(t), "sigma_A": sigma * 10}
    for name, est in zip(ESTIMATORS, (pred, anchor, previous, noisy, post)):
        rmse = float(torch.sqrt(((est - true) ** 2).sum(-1)[mask].mean()) * 10)
        bond_err, broken = _bond_stats(est, true, bonded)
        row[name] = {"ca_rmse_A": rmse, "ca_ca_err_A": bond_err, "broken": broken}
    return row


def markdown(rows: list[dict]) -> str:
    head = "| t | σ (Å) | " + " | ".join(f"{e}: RMSE / Cα–Cα err / broken" for e in ESTIMATORS) + " |"
    lines = [head, "|---|---|" + "---|" * len(ESTIMATORS)]
    for r in rows:
        cells = [f"{r[e]['ca_rmse_A']:.2f} / {r[e]['ca_ca_err_A']:.2f} / {r[e]['broken']:.2f}" for e in ESTIMATORS]
        lines.append(f"| {r['t']:g} | {r['sigma_A']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model file (default: the bundled default model)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    p.add_argument("--split", default="validation")
    p.add_argument("--t", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="diffusion times")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=8, help="frames per window")
    p.add_argument("--dt-ns", type=float, nargs=2, default=[0.01, 0.1], metavar=("MIN", "MAX"),
                   help="Δt range of the windows, ns")
    p.add_argument("--prior-nm", type=float, default=0.1, help="displacement prior s of the posterior estimator, nm")
    p.add_argument("--anchor-frames", type=int, default=None,
                   help="H of the anchor estimator, the mean of the last H frames (default: the model's anchor_frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        loaded = load_model(args.model)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    shards = load_split(args.manifest, args.split)
    if not shards:
        p.error(f"no shards in split {args.split!r} of {args.manifest}")
    windows = WindowSampler(shards, args.window, tuple(args.dt_ns), seed=args.seed).sample(args.windows)
    rows = [check(loaded, windows, t, args.prior_nm, args.seed, args.anchor_frames) for t in args.t]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
