"""How many reverse steps per frame? Sampler error with an *exact* denoiser, by step count.

With a trained network the sampler's error mixes model error and discretisation error. This
benchmark isolates the second: the target of one frame's translations is a Gaussian N(mu, s² I)
(an MD frame given its history: s ≈ 0.05–0.3 nm per residue at Δt = 0.01–10 ns), whose posterior
mean E[x0 | x_t] is known in closed form, so "the network" is exact. For K reverse steps, on the
sampler's quadratic time grid and on a uniform grid, SDE and probability-flow ODE, we report the
spread of the returned x0 relative to s (1.0 is right) and the bias of its mean (nm). The cost per
frame is linear in K (one network pass per step: see sampler_speed.py, ~0.017 s per step at N = 60).

    python benchmarks/steps_quality.py
"""
from __future__ import annotations

import argparse

import torch

from openmm_starmd.diffusion.se3_diffuser import SE3Diffuser
from openmm_starmd.geometry.rigid import Rigid
from openmm_starmd.sampling import SamplingConfig, time_grid


def uniform_grid(steps: int, t_min: float) -> list[float]:
    return torch.linspace(1.0, t_min, steps, dtype=torch.float64).tolist() if steps > 1 else [t_min]


def run(diffuser, s_nm: float, steps: int, grid: str, ode: bool, samples: int, seed: int):
    r3 = diffuser.r3
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    t_min = SamplingConfig().t_min
    times = time_grid(steps, t_min) if grid == "quadratic" else uniform_grid(steps, t_min)
    x = diffuser.sample_prior((samples,), generator=g, dtype=torch.float64)
    for k, t in enumerate(times):
        a, v = r3.mean_coef(t).item(), r3.variance(t).item()
        x0 = Rigid(x.rots, mu + a * s_nm**2 / (a * a * s_nm**2 + v) * (x.trans - a * mu))
        if k == len(times) - 1:
            break
        x = diffuser.reverse_step(x, x0, t, t - times[k + 1], ode=ode, generator=g)
    spread = x0.trans.std(0).mean().item() / s_nm
    bias = (x0.trans.mean(0) - mu).norm().item()
    return spread, bias


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    p.add_argument("--spreads-nm", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    d = SE3Diffuser()
    print(f"default steps: {SamplingConfig().steps}; cells: x0 spread / target spread (bias nm)")
    header = "| s (nm) | sampler | grid | " + " | ".join(f"K={k}" for k in a.steps) + " |"
    print(header)
    print("|" + "---|" * (3 + len(a.steps)))
    for s in a.spreads_nm:
        for ode in (False, True):
            for grid in ("quadratic", "uniform"):
                cells = []
                for k in a.steps:
                    spread, bias = run(d, s, k, grid, ode, a.samples, a.seed)
                    cells.append(f"{spread:.2f} ({bias:.3f})")
                print(f"| {s} | {'ODE' if ode else 'SDE'} | {grid} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
