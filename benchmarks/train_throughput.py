#!/usr/bin/env python
"""Training throughput: tokens/s and windows/s of one optimiser step of training/train.py.

One step = draw the windows, build the block-causal [clean 1..L, noisy 1..L] sequence (t, τ and
noise draws included), forward, the FrameDiff loss with auxiliary terms, backward, gradient
clipping, AdamW and the EMA update -- exactly ``Trainer.train_step`` without DDP. Tokens are
B × 2L × N per step (every residue of every clean and noisy frame).

Data: the real 1ENH trajectory (tests/data/short_md_1enh.npz, N = 48) and, for larger N, the
protein of 3MHT (tests/data/hhai_dna_sah_3mht.pdb, 327 residues) as a static trajectory cropped
to N contiguous residues (speed does not depend on the motion).

    python benchmarks/train_throughput.py                           # default config, ~2 min on 2 CPU cores
    python benchmarks/train_throughput.py --residues 48 128 256 --batch 1 4 --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "training"))
from training_helpers import load_training_module  # noqa: E402

from openmm_starmd.data import BackboneShard  # noqa: E402
from openmm_starmd.diffusion import SE3Diffuser  # noqa: E402
from openmm_starmd.model import StarMDNetwork  # noqa: E402
from timing import seconds_per_call  # noqa: E402

train = load_training_module("train")


def shards_with(n_residues: int) -> list[BackboneShard]:
    """A trajectory with at least ``n_residues`` residues (see the module docstring)."""
    if n_residues <= 48:
        d = np.load(REPO / "tests" / "data" / "short_md_1enh.npz")
        bb = d["backbone_nm"]
        return [BackboneShard(bb, 0.1, str(d["sequence"]), d["residue_index"], d["chain_index"], ["A"],
                              np.ones(bb.shape[1], bool), name="1enh")]
    from openmm_starmd.protein import load_protein

    prot = load_protein(REPO / "tests" / "data" / "hhai_dna_sah_3mht.pdb")
    keep = np.flatnonzero(prot.chain_index == 0)
    if keep.size < n_residues:
        raise SystemExit(f"--residues {n_residues}: the largest test protein has {keep.size}; use fewer.")
    coords = np.repeat(prot.backbone_nm[None, keep], 100, axis=0)
    return [BackboneShard(coords, 0.1, "".join(prot.sequence[i] for i in keep), prot.residue_index[keep],
                          prot.chain_index[keep], list(prot.chain_ids[:1]), prot.mask[keep], name="3mht")]


def measure(cfg, n_residues: int, batch: int, steps: int, device: torch.device) -> tuple[float, float, int]:
    """(windows/s, tokens/s, tokens per step) of ``steps`` timed optimiser steps after one warm-up step."""
    sampler = train.WindowSampler(shards_with(n_residues), cfg.window, (0.1, 1.0), max_residues=n_residues, seed=0)
    torch.manual_seed(0)
    net = StarMDNetwork(cfg.model_config()).to(device)
    ema = train.EMA(net, cfg.ema_decay)
    opt = train.build_optimizer(net, cfg)
    diffuser = SE3Diffuser(cfg.diffusion_config())
    loss_cfg = train.LossConfig(**cfg.loss)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = 0

    def step():
        nonlocal tokens
        b = sampler.sample(batch)
        terms = train.batch_loss(net, diffuser, loss_cfg, b, g, cfg, device, torch.float32)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(net)
        tokens = int(b["mask"].sum()) * 2 * cfg.window

    dt = seconds_per_call(step, steps, device)
    return batch / dt, tokens / dt, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--residues", type=int, nargs="+", default=[48, 128], help="residues per window N")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="windows per step B (one process)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-size", default="default", choices=("default", "paper"))
    p.add_argument("--window", type=int, default=8, help="training window L")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = train.TrainConfig(model_size=args.model_size, window=args.window, device=args.device)
    amp = "bf16 autocast" if device.type == "cuda" else "float32"
    print(f"model {args.model_size!r}, L = {cfg.window}, {amp}, device {device}, {args.threads} thread(s); "
          f"{sum(p.numel() for p in StarMDNetwork(cfg.model_config()).parameters()):,} parameters")
    print("| N | B | tokens/step | s/step | windows/s | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.residues:
        for b in args.batch:
            w, tok, per = measure(cfg, n, b, args.steps, device)
            print(f"| {n} | {b} | {per} | {b / w:.3f} | {w:.2f} | {tok:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
