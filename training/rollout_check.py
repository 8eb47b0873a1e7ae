#!/usr/bin/env python
"""Roll a model out on the backbone shards of a manifest and score the Cα frames it makes.

The quick, backbone-only check behind the model card: for every chosen protein, the first
``--history`` frames of its replica-0 shard (at the stride that gives ``--dt-ns``) are the
history; the model generates ``--frames`` more; no OpenMM, no backmapping. Printed per protein
(Markdown table, and ``--json`` for the numbers):

- Cα validity: the fraction of generated frames with no clash (two Cα that are not same-chain
  neighbours closer than 3.0 Å) and no break (consecutive Cα of a chain further than 4.19 Å),
  computed by :func:`openmm_starmd.analysis.validity.ca_validity`, the evaluation suite's own
  function, so these numbers and ``starmd evaluate``'s agree;
- consecutive Cα–Cα distance min / mean / max over all generated frames, Å (MD: ~3.8 ± 0.05);
- drift: Cα RMSD after superposition of the last generated frame to the last history frame, Å,
  next to the same quantity for the reference MD over the same time span where the shard is long
  enough (``ref drift``);
- step: mean Cα RMSD (superposed) between consecutive frames of the rollout, from the last
  history frame on, Å, next to the mean over every pair of reference frames Δt apart (``MD
  step``): whether the model moves as far per frame as MD does at the Δt it is conditioned on;
- RMSF r: Pearson r of the per-residue Cα RMSF of the generated frames and of the reference
  shard (all its frames; meaningful only when the rollout spans a time comparable to the shard).

Example::

    python training/rollout_check.py openmm_starmd/data/starmd_default.pt --proteins 2M9I villin_hp35 \\
        --dt-ns 0.1 --frames 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import mdtraj as md
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from openmm_starmd.analysis.alignment import superposed_rmsd  # noqa: E402
from openmm_starmd.analysis.coverage import rmsf_correlation  # noqa: E402
from openmm_starmd.analysis.validity import broken_pairs, ca_validity, consecutive_ca_pairs  # noqa: E402
from openmm_starmd.checkpoints import load_model  # noqa: E402
from openmm_starmd.data import load_shard  # noqa: E402
from openmm_starmd.geometry.frames import frames_from_backbone  # noqa: E402
from openmm_starmd.sampling import AutoregressiveSampler  # noqa: E402

DEFAULT_MANIFEST = os.path.join(HERE, "data", "manifest.json")


def ca_topology(residue_index: np.ndarray, chain_index: np.ndarray) -> md.Topology:
    """A Cα-only mdtraj Topology with one chain per chain index (residue names are placeholders)."""
    top = md.Topology()
    chains = {}
    for r, c in zip(np.asarray(residue_index).tolist(), np.asarray(chain_index).tolist()):
        if c not in chains:
            chains[c] = top.add_chain()
        res = top.add_residue("GLY", chains[c], resSeq=int(r))
        top.add_atom("CA", md.element.carbon, res)
    return top


def ca_geometry(ca_nm: np.ndarray, residue_index: np.ndarray, chain_index: np.ndarray,
                reference_nm: np.ndarray | None = None) -> dict:
    """Cα validity and consecutive-distance statistics of frames.

    Validity is :func:`openmm_starmd.analysis.validity.ca_validity` (the evaluation suite's own
    definition: clash = two Cα that are not same-chain neighbours closer than 3.0 Å; break =
    consecutive Cα of a chain further than 4.19 Å), with the gaps already present in
    ``reference_nm`` (missing residues) exempt, as the evaluation does for the initial structure.

    Parameters
    ----------
    ca_nm : np.ndarray, shape (F, N, 3), nm
    residue_index, chain_index : np.ndarray, shape (N,)
    reference_nm : np.ndarray, shape (N, 3), nm, optional
        Structure whose broken pairs are exempt (default: none exempt).

    Returns
    -------
    dict with ``valid`` (F,) bool, ``ca_ca_A`` (min, mean, max) in Å over the checked pairs.
    """
    top = ca_topology(residue_index, chain_index)
    traj = md.Trajectory(np.asarray(ca_nm, dtype=np.float32), top)
    gaps = None
    if reference_nm is not None:
        gaps = broken_pairs(md.Trajectory(np.asarray(reference_nm, dtype=np.float32)[None], top))
    valid = ca_validity(traj, ignore_pairs=gaps).valid
    pairs = consecutive_ca_pairs(top)
    if gaps is not None and len(gaps):
        skip = {tuple(p) for p in gaps.tolist()}
        pairs = np.array([p for p in pairs.tolist() if tuple(p) not in skip], dtype=int).reshape(-1, 2)
    d_next = np.linalg.norm(ca_nm[:, pairs[:, 0]] - ca_nm[:, pairs[:, 1]], axis=-1)
    return {"valid": valid,
            "ca_ca_A": (float(d_next.min() * 10), float(d_next.mean() * 10), float(d_next.max() * 10))}


def _rmsd_nm(a: np.ndarray, b: np.ndarray) -> float:
    return float(superposed_rmsd(a[None], b[None])[0])


#: Below this Δt (ns) MD pairs that span a reconstructed restart are left out of the MD step, as
#: the training windows leave them out (training/data.py RESTART_MIN_DT_NS, the same value).
RESTART_MIN_DT_NS = 1.0


def mean_step_A(ca_nm: np.ndarray, stride: int = 1, restarts=()) -> float:
    """Mean superposed Cα RMSD (Å) between frames ``stride`` apart; ca_nm (F, N, 3) nm, F > stride.

    Pairs (i, i + stride) with ``i < r <= i + stride`` for a frame ``r`` in ``restarts`` are left
    out (when any pair is left)."""
    rmsd = superposed_rmsd(ca_nm[stride:], ca_nm[:-stride])
    i = np.arange(len(rmsd))
    keep = np.ones(len(rmsd), dtype=bool)
    for r in restarts:
        keep &= ~((i < r) & (i + stride >= r))
    return float((rmsd[keep] if keep.any() else rmsd).mean() * 10)


def check_protein(loaded, shard, dt_ns: float, n_frames: int, n_history: int, seed: int, steps: int | None,
                  **sampling) -> dict:
    """Roll out one protein; the metrics of the module docstring."""
    stride = max(1, int(round(dt_ns / shard.frame_spacing_ns)))
    idx = np.arange(n_history) * stride
    if idx[-1] >= shard.n_frames:
        raise ValueError(f"{shard.name}: {n_history} history frames at stride {stride} need {idx[-1] + 1} frames; "
                         f"the shard has {shard.n_frames}. Lower --history or --dt-ns.")
    xyz = torch.as_tensor(shard.coords_nm[idx], dtype=torch.float32)
    frames = frames_from_backbone(xyz[..., 0, :], xyz[..., 1, :], xyz[..., 2, :])
    import dataclasses

    changes = {k: v for k, v in dict(sampling, steps=steps).items() if v is not None}
    config = dataclasses.replace(loaded.sampling_config, **changes)
    sampler = AutoregressiveSampler(loaded.model, loaded.diffuser, shard.aatype, shard.residue_index,
                                    shard.chain_index, shard.residue_mask, dt_ns=stride * shard.frame_spacing_ns,
                                    config=config, seed=seed)
    sampler.add_history(frames)
    out = sampler.generate(n_frames)
    ca = out.trans.reshape(-1, shard.n_residues, 3).detach().cpu().numpy().astype(np.float64)
    ref_ca = shard.coords_nm[:, :, 1].astype(np.float64)
    last_hist = ref_ca[idx[-1]]
    geo = ca_geometry(ca, shard.residue_index, shard.chain_index, reference_nm=last_hist)
    end = idx[-1] + n_frames * stride
    restarts = ([int(r["frame"]) for r in shard.provenance.get("restarts", [])]
                if stride * shard.frame_spacing_ns < RESTART_MIN_DT_NS - 1e-9 else [])
    row = {
        "protein": shard.name, "residues": shard.n_residues, "dt_ns": stride * shard.frame_spacing_ns,
        "t_min": config.t_min, "frames": n_frames, "ca_validity": float(geo["valid"].mean()), "ca_ca_A": geo["ca_ca_A"],
        "drift_A": _rmsd_nm(ca[-1], last_hist) * 10,
        "ref_drift_A": _rmsd_nm(ref_ca[end], last_hist) * 10 if end < shard.n_frames else None,
        "rmsf_r": rmsf_correlation(ref_ca, ca) if n_frames >= 3 else None,
        "step_A": mean_step_A(np.concatenate([last_hist[None], ca])),
        "ref_step_A": mean_step_A(ref_ca, stride, restarts) if stride < shard.n_frames else None,
    }
    ref_geo = ca_geometry(ref_ca, shard.residue_index, shard.chain_index, reference_nm=ref_ca[0])
    row["ref_ca_validity"] = float(ref_geo["valid"].mean())
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    def f(x, fmt):
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)

    lines = ["| protein | residues | Δt (ns) | t_min | frames | Cα validity (MD) | Cα–Cα min / mean / max (Å) "
             "| drift (Å) | MD drift (Å) | step (Å) | MD step (Å) | RMSF r |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cc = "{:.2f} / {:.2f} / {:.2f}".format(*r["ca_ca_A"])
        lines.append(f"| {r['protein']} | {r['residues']} | {r['dt_ns']:g} | {f(r.get('t_min'), 'g')} | {r['frames']} | "
                     f"{r['ca_validity']:.2f} ({r['ref_ca_validity']:.2f}) | {cc} | {f(r['drift_A'], '.2f')} | "
                     f"{f(r['ref_drift_A'], '.2f')} | {f(r.get('step_A'), '.2f')} | {f(r.get('ref_step_A'), '.2f')} | "
                     f"{f(r['rmsf_r'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model file (default: the bundled default model)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST, help="manifest.json of training/prepare.py")
    p.add_argument("--proteins", nargs="+", default=None,
                   help="proteins to check (default: every protein of --split)")
    p.add_argument("--split", default="test", help="split whose proteins are checked when --proteins is not given")
    p.add_argument("--dt-ns", type=float, nargs="+", default=[0.1], help="frame spacing(s) of the rollout, ns")
    p.add_argument("--frames", type=int, default=20, help="frames to generate per protein")
    p.add_argument("--history", type=int, default=1, help="MD frames given as history")
    p.add_argument("--steps", type=int, default=None, help="reverse diffusion steps (default: the model's)")
    p.add_argument("--ode", action="store_true", default=None, help="probability-flow ODE instead of the reverse SDE")
    p.add_argument("--noise-scale", type=float, default=None, help="SDE noise multiplier (default: the model's)")
    p.add_argument("--t-min", type=float, nargs="+", default=[None],
                   help="diffusion time(s) of the last network pass, whose x0 is the frame (default: the model's); "
                        "several values sweep it, e.g. to pick t_min on the validation proteins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.manifest) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(args.manifest))
    entries = {}
    for e in manifest["shards"]:
        if e["replica"] == 0 and (args.proteins is None and e["split"] == args.split
                                  or args.proteins is not None and e["protein"] in args.proteins):
            entries[e["protein"]] = e
    missing = sorted(set(args.proteins or []) - set(entries))
    if missing:
        p.error(f"no replica-0 shard of {missing} in {args.manifest}; see `python training/prepare.py --summary`.")
    try:
        loaded = load_model(args.model)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    rows = []
    for name in (args.proteins or sorted(entries)):
        shard = load_shard(os.path.join(base, entries[name]["file"]), entries[name]["sha256"])
        for dt in args.dt_ns:
            for t_min in args.t_min:
                rows.append(check_protein(loaded, shard, dt, args.frames, args.history, args.seed, args.steps,
                                          ode=args.ode, noise_scale=args.noise_scale, t_min=t_min))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
