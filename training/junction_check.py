#!/usr/bin/env python
"""Do reconstructed restarts show in the backbone data? (see ``restore_md.py``)

A trajectory restored by reconstruction keeps its backbone but gets new side chains, hydrogens
and velocities at the restart frame F. If that were visible in the data a model learns from, the
backbone step across the restart (frames F-1 -> F, and longer lags spanning F) would stand out
from the ordinary steps of the same trajectory. For every shard of the manifest with restarts and
each lag k (frames), this compares the Cα RMSD after optimal superposition of frame pairs
(i, i + k) that span a restart with all pairs that do not, and prints the mean of each and the
percentile of the spanning pairs' mean among ordinary pairs. A PNG shows the distributions.

    python training/junction_check.py [--manifest training/data/manifest.json] [--lags 1 10 100]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from openmm_starmd.analysis.alignment import superposed_rmsd  # noqa: E402


def junction_stats(coords_nm: np.ndarray, mask: np.ndarray, restarts, lags) -> list[dict]:
    """Per lag: spanning vs ordinary superposed Cα RMSD of frame pairs.

    coords_nm : (F, N, 4, 3) nm; mask : (N,) valid residues; restarts : frame indices F_r (the
    first frame after a restart). A pair (i, i + k) spans restart F_r when i < F_r <= i + k.
    """
    ca = coords_nm[:, mask, 1].astype(np.float64)
    out = []
    for k in lags:
        if ca.shape[0] <= k:
            continue
        i = np.arange(ca.shape[0] - k)
        rmsd = superposed_rmsd(ca[i], ca[i + k])
        spans = np.zeros(i.shape, dtype=bool)
        for f in restarts:
            spans |= (i < f) & (i + k >= f)
        if not spans.any() or spans.all():
            continue
        ordinary, spanning = rmsd[~spans], rmsd[spans]
        out.append({"lag_frames": int(k), "n_spanning": int(spanning.size), "n_ordinary": int(ordinary.size),
                    "spanning_mean_nm": float(spanning.mean()), "ordinary_mean_nm": float(ordinary.mean()),
                    "ordinary_p5_nm": float(np.percentile(ordinary, 5)),
                    "ordinary_p95_nm": float(np.percentile(ordinary, 95)),
                    "percentile_of_spanning_mean": float((ordinary < spanning.mean()).mean() * 100.0),
                    "spanning": spanning.tolist(), "ordinary": ordinary.tolist()})
    return out


def main(argv=None) -> int:
    from openmm_starmd.data import load_shard

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default=os.path.join(HERE, "data", "manifest.json"))
    p.add_argument("--lags", type=int, nargs="+", default=[1, 10, 100], help="lags in frames")
    p.add_argument("--png", default=None, help="plot file (default: next to the manifest, junction_check.png)")
    args = p.parse_args(argv)
    with open(args.manifest) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(args.manifest))
    rows = []
    for e in manifest["shards"]:
        shard = load_shard(os.path.join(base, e["file"]), e.get("sha256"))
        restarts = [int(r["frame"]) for r in shard.provenance.get("restarts", [])]
        restarts = [f for f in restarts if 0 < f < shard.n_frames]
        if not restarts:
            continue
        for st in junction_stats(shard.coords_nm, shard.residue_mask, restarts, args.lags):
            rows.append(dict(st, protein=e["protein"], replica=e["replica"], frames_after=shard.n_frames - max(restarts)))
    if not rows:
        print("no shard has a reconstructed restart with frames after it; nothing to compare")
        return 0
    print(f"{'trajectory':22s} {'lag':>5s} {'after':>5s} {'spanning':>9s} {'ordinary':>9s} {'ord 5-95%':>13s} {'pct':>5s}")
    for r in rows:
        print(f"{r['protein'] + '/r' + str(r['replica']):22s} {r['lag_frames']:5d} {r['frames_after']:5d} "
              f"{r['spanning_mean_nm'] * 10:8.2f}Å {r['ordinary_mean_nm'] * 10:8.2f}Å "
              f"{r['ordinary_p5_nm'] * 10:5.2f}-{r['ordinary_p95_nm'] * 10:5.2f}Å {r['percentile_of_spanning_mean']:5.0f}")
    print("spanning/ordinary: mean superposed Cα RMSD of frame pairs that span a restart / that do not; "
          "pct: percentile of the spanning mean among ordinary pairs (50 = typical)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = sorted({r["lag_frames"] for r in rows})
    fig, axes = plt.subplots(1, len(lags), figsize=(4.2 * len(lags), 3.4), squeeze=False)
    for ax, k in zip(axes[0], lags):
        sel = [r for r in rows if r["lag_frames"] == k]
        ordinary = np.concatenate([r["ordinary"] for r in sel]) * 10
        spanning = np.concatenate([r["spanning"] for r in sel]) * 10
        bins = np.linspace(0, max(ordinary.max(), spanning.max()) * 1.05, 40)
        ax.hist(ordinary, bins=bins, density=True, alpha=0.6, label=f"ordinary ({ordinary.size})")
        ax.hist(spanning, bins=bins, density=True, alpha=0.6, label=f"spanning a restart ({spanning.size})")
        ax.set_xlabel(f"superposed Cα RMSD at lag {k} frames (Å)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.suptitle("Backbone steps across reconstructed restarts vs ordinary steps")
    fig.tight_layout()
    png = args.png or os.path.join(base, "junction_check.png")
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
