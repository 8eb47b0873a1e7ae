"""Cost of the Cα projection per generated frame, next to the network pass it follows.

For each chain length N in --residues, a compact random chain (3.8 Å steps, no two Cα closer than
4.5 Å) stands in for a protein; every Cα gets Gaussian noise of --noise-nm per coordinate (0.05 nm
makes chain links of 3.0–4.7 Å and contacts below 3.5 Å, about what the bundled model's frames
need repairing). Timed side by side in one run, one thread:

- ``project_ca`` as shipped (only the non-bonded pairs near their bound followed per sweep);
- the same sweeps following every non-bonded pair in every sweep (``margin_nm=inf``, the O(N²)
  form it replaced);

and, for scale, one network pass of the default model at that N (``SamplingConfig().steps`` of
them make a frame). Prints ms per frame and the ratios.

    python benchmarks/ca_projection_speed.py                     # N = 50, 200, 1000
"""
from __future__ import annotations

import argparse
import time

import torch

from openmm_starmd.geometry.ca_constraints import build_ca_constraints, project_ca


def compact_chain(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) nm: a random walk of 0.38 nm steps whose non-neighbour Cα stay >= 0.45 nm apart."""
    x = [torch.zeros(3, dtype=torch.float64)]
    while len(x) < n:
        step = torch.randn(3, generator=generator, dtype=torch.float64)
        cand = x[-1] + 0.38 * step / step.norm()
        if len(x) < 3 or float(torch.cdist(cand[None], torch.stack(x[:-2])).min()) > 0.45:
            x.append(cand)
    return torch.stack(x)


def network_pass_ms(n: int, repeats: int) -> float:
    """One denoising pass of the bundled model's architecture on N residues with one history frame."""
    from openmm_starmd.checkpoints import load_model
    from openmm_starmd.geometry.rigid import Rigid
    from openmm_starmd.geometry.so3 import random_rotations
    from openmm_starmd.model.sequence import ResidueFeatures

    loaded = load_model()
    net = loaded.model.eval()
    g = torch.Generator().manual_seed(0)
    trans = compact_chain(n, g).float()[None]
    frames = Rigid(random_rotations((1, n), generator=g), trans)
    res = ResidueFeatures.build(torch.zeros(n, dtype=torch.long), torch.arange(n), torch.zeros(n, dtype=torch.long))
    rollout = net.start_rollout(res, 1.0, mode="window", window=net.config.context_frames)
    with torch.no_grad():
        net.append_clean(rollout, frames, torch.zeros(1), anchor=frames)
        net.denoise(rollout, frames, 0.5)
        t = time.perf_counter()
        for _ in range(repeats):
            net.denoise(rollout, frames, 0.5)
    return (time.perf_counter() - t) / repeats * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--residues", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--noise-nm", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| N | sweeps | project_ca (ms) | every pair every sweep (ms) | ratio | one network pass (ms) | "
          "projection / 20 passes |")
    print("|---|---|---|---|---|---|---|")
    for n in a.residues:
        g = torch.Generator().manual_seed(a.seed)
        ref = compact_chain(n, g)
        c = build_ca_constraints(torch.arange(n), torch.zeros(n, dtype=torch.long), None, ref)
        noisy = (ref + a.noise_nm * torch.randn(ref.shape, generator=g, dtype=torch.float64)).float()
        times, dense_times = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            y, info = project_ca(noisy, c)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            yd, _ = project_ca(noisy, c, margin_nm=float("inf"))
            dense_times.append(time.perf_counter() - t)
        assert float((y - yd).abs().max()) < 1e-4, "the two forms disagree"
        fast, dense = min(times) * 1000, min(dense_times) * 1000
        net_ms = network_pass_ms(n, a.repeats)
        print(f"| {n} | {info['sweeps']} | {fast:.1f} | {dense:.1f} | {dense / fast:.1f}x | {net_ms:.1f} | "
              f"{fast / (20 * net_ms):.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
