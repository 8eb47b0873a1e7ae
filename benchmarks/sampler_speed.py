"""Sampler speed and memory: time per generated frame vs. protein size N and history length L.

For every N in --residues and L in --history this measures, with the model of --config and the
default sampling settings (``SamplingConfig().steps`` reverse steps per frame unless --steps):

- ``full``:   KV cache of the whole history (memory O(L N));
- ``window``: sliding-window KV cache of the model's training window W (memory O(W N));
- ``none``:   no cache: every reverse step recomputes the whole block-causal forward over the L
              clean history frames plus the noisy one (what the cache saves).

Each cell runs in a fresh subprocess so its peak memory (ru_maxrss) is its own; "extra MB" is
that peak minus the process's resident size after building the model, and "cache MB" the key/
value buffers alone. Histories are filled synthetically: the cache's key/value buffers are set to
random numbers for L frames (attention cost does not depend on their values), because appending
1000 real frames at N=200 would itself take hours. Cells whose frame would exceed --budget
seconds are timed on a single network pass and extrapolated (marked "~"); "-" marks cells that
would not fit in memory (no-cache mode with more than --max-tokens tokens).

Wall-clock time depends on the machine's load; process CPU time is also reported (with one
thread it approximates the wall time on an idle core). Rerun on a quiet machine.

Usage (from the repository root):
    python benchmarks/sampler_speed.py                      # full grid, 2 threads
    python benchmarks/sampler_speed.py --residues 60 --history 8 --modes window   # the budget cell
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _synthetic_protein(N: int, dtype):
    import torch

    from openmm_starmd.geometry.rigid import Rigid
    from openmm_starmd.geometry.so3 import random_rotations

    g = torch.Generator().manual_seed(0)
    steps = torch.randn(N, 3, generator=g, dtype=dtype)
    ca = 0.38 * torch.cumsum(steps / steps.norm(dim=-1, keepdim=True), 0)  # a 3.8 Å random walk
    return Rigid(random_rotations((N,), generator=g, dtype=dtype), ca)


def _fill_cache(cache, L: int) -> None:
    """Pretend L frames (0..L-1) have been appended: random keys/values, bookkeeping set."""
    import torch

    if L <= 0:
        return
    if cache.mode == "full":
        cache.slot_for(L)  # room for the scratch slot too, as in a rollout that grew to L frames
        frames = range(L)
    else:
        frames = range(max(0, L - cache.window), L)
    g = torch.Generator().manual_seed(1)
    for store in (cache.keys, cache.values):
        for buf in store.values():
            buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype) * 0.3)
    for f in frames:
        cache.slot_frame[cache.slot_for(f)] = f
    cache.last_frame = cache.start_frame + L - 1


def run_cell(args) -> dict:
    """Measure one (N, L, mode) cell in this process."""
    import torch

    torch.set_num_threads(args.threads)
    from openmm_starmd.diffusion import SE3Diffuser
    from openmm_starmd.geometry.rigid import Rigid
    from openmm_starmd.model import StarMDNetwork, model_config
    from openmm_starmd.model.sequence import ResidueFeatures, TokenSequence
    from openmm_starmd.sampling import AutoregressiveSampler, SamplingConfig

    N, L, mode = args.cell
    N, L = int(N), int(L)
    dtype = torch.float32
    device = torch.device(args.device)
    net = StarMDNetwork(model_config(args.config)).to(device).eval()
    steps = args.steps or SamplingConfig().steps
    aatype = torch.arange(N) % 20
    frame = _synthetic_protein(N, dtype)
    baseline = _rss_mb()
    result = {"N": N, "L": L, "mode": mode, "steps": steps, "threads": args.threads, "config": args.config}

    if mode in ("full", "window"):
        cfg = SamplingConfig(steps=steps, cache_mode=mode)
        sampler = AutoregressiveSampler(net, SE3Diffuser(), aatype, torch.arange(N), torch.zeros(N, dtype=torch.long),
                                        None, 0.1, cfg, seed=0, device=device, dtype=dtype)
        sampler.add_history(frame)
        cache = sampler._rollout.cache
        cache.last_frame = None  # refill from scratch with L frames
        cache.slot_frame.fill_(-1)
        _fill_cache(cache, L)
        result["cache_mb"] = cache.memory_bytes() / 2**20
        # one warm-up pass, then time a pass to decide whether a whole frame fits the budget
        noisy = Rigid(frame.rots[None].to(device), frame.trans[None].to(device))
        with torch.no_grad():
            net.denoise(sampler._rollout, noisy, 0.5)
            t0, c0 = time.perf_counter(), time.process_time()
            net.denoise(sampler._rollout, noisy, 0.5)
            per_pass, cpu_pass = time.perf_counter() - t0, time.process_time() - c0
        if per_pass * (steps + 1) * args.frames <= args.budget:
            t0, c0 = time.perf_counter(), time.process_time()
            sampler.generate(args.frames)
            result["s_per_frame"] = (time.perf_counter() - t0) / args.frames
            result["cpu_s_per_frame"] = (time.process_time() - c0) / args.frames
            result["extrapolated"] = False
        else:
            result["s_per_frame"] = per_pass * (steps + 1)
            result["cpu_s_per_frame"] = cpu_pass * (steps + 1)
            result["extrapolated"] = True
    else:  # no cache: every reverse step is a full forward over [clean 0..L-1, noisy L]
        tokens = (L + 1) * N
        if tokens > args.max_tokens:
            result.update(s_per_frame=None, skipped=f"{tokens} tokens > --max-tokens")
            return result
        res = ResidueFeatures.build(aatype, torch.arange(N), torch.zeros(N, dtype=torch.long), device=device)
        S = L + 1
        seq = TokenSequence(
            frames=Rigid(frame.rots.expand(1, S, N, 3, 3).to(device), frame.trans.expand(1, S, N, 3).to(device)),
            frame_index=torch.arange(S, device=device).clamp_max(L - 1 if L else 0).clone(),
            noisy=torch.arange(S, device=device) == L,
            noise_level=torch.full((1, S), 0.05, device=device),
            dt_ns=torch.full((1,), 0.1, device=device),
        )
        seq.frame_index[-1] = L
        with torch.no_grad():
            net(res, seq)  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            net(res, seq)
            per_pass, cpu_pass = time.perf_counter() - t0, time.process_time() - c0
            if per_pass * steps <= args.budget:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    net(res, seq)
                result["s_per_frame"] = time.perf_counter() - t0
                result["cpu_s_per_frame"] = time.process_time() - c0
                result["extrapolated"] = False
            else:
                result["s_per_frame"] = per_pass * steps
                result["cpu_s_per_frame"] = cpu_pass * steps
                result["extrapolated"] = True
        result["cache_mb"] = 0.0
    result["extra_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default", help="named model config (default, paper)")
    p.add_argument("--residues", type=int, nargs="+", default=[20, 60, 200])
    p.add_argument("--history", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--modes", nargs="+", default=["full", "window", "none"], choices=["full", "window", "none"])
    p.add_argument("--steps", type=int, default=None, help="reverse steps per frame (default: SamplingConfig)")
    p.add_argument("--frames", type=int, default=2, help="frames timed per cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per cell before extrapolating")
    p.add_argument("--max-tokens", type=int, default=12000, help="largest no-cache sequence to attempt")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cell:
        print(json.dumps(run_cell(args)))
        return 0

    rows = []
    for N in args.residues:
        for L in args.history:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--cell", str(N), str(L), mode, "--config", args.config,
                       "--frames", str(args.frames), "--threads", str(args.threads), "--device", args.device,
                       "--budget", str(args.budget), "--max-tokens", str(args.max_tokens)]
                if args.steps:
                    cmd += ["--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {"N": N, "L": L, "mode": mode, "s_per_frame": None, "skipped": proc.stderr.strip().splitlines()[-1:]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\nmodel config {args.config!r}, {args.threads} thread(s), device {args.device}, "
          f"{rows[0].get('steps', '?')} reverse steps per frame\n")
    print("| N | history L | mode | wall s / frame | CPU s / frame | cache MB | extra peak MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("s_per_frame") is None:
            print(f"| {r['N']} | {r['L']} | {r['mode']} | - | - | - | - |")
            continue
        mark = "~" if r.get("extrapolated") else ""
        print(f"| {r['N']} | {r['L']} | {r['mode']} | {mark}{r['s_per_frame']:.3f} | {mark}{r['cpu_s_per_frame']:.3f} | "
              f"{r['cache_mb']:.1f} | {r['extra_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
