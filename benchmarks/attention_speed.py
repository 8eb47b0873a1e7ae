#!/usr/bin/env python
"""Joint attention over a training sequence: grouped key sets (FullContext) vs one dense masked SDPA.

Both compute the same attention (tests/model/test_attention.py checks equality to 1e-12 in
float64): the dense form scores every (S·N)² token pair and masks the invisible ones, the grouped
form (openmm_starmd.model.attention.FullContext) only scores the key slots each query slot may see
under the block-causal mask. Timed forward + backward, side by side, same inputs; the ratio is
dense time / grouped time.

    python benchmarks/attention_speed.py                 # L = 8, B = 4, N = 48 and 128, 1 thread
    python benchmarks/attention_speed.py --device cuda --residues 128 256
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from openmm_starmd.model.attention import FullContext
from openmm_starmd.model.masks import slot_visibility
from timing import seconds_per_call


def dense(frame, noisy, valid, q, k, v):
    B, H, S, N, _ = q.shape
    vis = slot_visibility(frame[:, None], noisy[:, None], frame[None, :], noisy[None, :])
    mask = (vis[None, :, None, :, None] & valid[:, None, None, None, :]).expand(B, S, N, S, N).reshape(B, 1, S * N, S * N)
    out = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), attn_mask=mask, scale=1.0)
    return out.view(B, H, S, N, -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--residues", type=int, nargs="+", default=[48, 128])
    p.add_argument("--window", type=int, default=8, help="frames L (2L slots: clean and noisy)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=28, help="fused q/k channels per head (scalar + points + bias)")
    p.add_argument("--value-dim", type=int, default=40, help="value channels per head (scalar + points)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    L = a.window
    frame = torch.cat([torch.arange(L), torch.arange(L)]).to(dev)
    noisy = torch.cat([torch.zeros(L, dtype=torch.bool), torch.ones(L, dtype=torch.bool)]).to(dev)
    print(f"L = {L} (S = {2 * L} slots), B = {a.batch}, H = {a.heads}, device {dev}, {a.threads} thread(s); "
          "forward + backward")
    print("| N | tokens | dense (ms) | grouped (ms) | dense / grouped |")
    print("|---:|---:|---:|---:|---:|")
    for n in a.residues:
        g = torch.Generator(device=dev).manual_seed(0)
        shape = (a.batch, a.heads, 2 * L, n)
        q = torch.randn(*shape, a.dim, generator=g, device=dev, requires_grad=True)
        k = torch.randn(*shape, a.dim, generator=g, device=dev, requires_grad=True)
        v = torch.randn(*shape, a.value_dim, generator=g, device=dev, requires_grad=True)
        valid = torch.ones(a.batch, n, dtype=torch.bool, device=dev)
        valid[0, -3:] = False  # a padded example, as in a batch of unequal proteins

        def run_dense():
            dense(frame, noisy, valid, q, k, v).sum().backward()

        def run_grouped():
            FullContext(frame, noisy, valid).attend(0, "joint", q, k, v).sum().backward()

        td = seconds_per_call(run_dense, a.repeats, dev)
        tg = seconds_per_call(run_grouped, a.repeats, dev)
        print(f"| {n} | {2 * L * n} | {td * 1e3:.1f} | {tg * 1e3:.1f} | {td / tg:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
