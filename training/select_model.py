#!/usr/bin/env python
"""Pick one of several trained models (and its last diffusion time) on the validation proteins,
by a rule fixed before the comparison.

    python training/select_model.py training/runs/a/model.pt training/runs/b/model.pt \\
        --t-min 0.01 0.03 0.05 --dt-ns 0.01 0.1 1.0 --frames 50 --json select.json

Every (model, t_min) candidate is rolled out from the first frame of each validation protein's
replica-0 shard at every ``--dt-ns`` (``training/rollout_check.py``'s :func:`check_protein`,
backbone only, same seed for all), and scored by two numbers over those rollouts:

- **validity**: the mean Cα validity of the generated frames (no Cα clash < 3.0 Å, no
  consecutive Cα > 4.19 Å; every MD frame passes);
- **step error**: the mean |log(step / MD step)|, where step is the mean Cα RMSD between
  consecutive generated frames and MD step the same over the reference frames Δt apart, i.e. how
  far the model is from moving as much per frame as MD does *at the Δt it is asked for* (0 is
  exact; log 2 = 0.69 is a factor of two either way). It is what a model that ignores Δt fails.

**The rule** (:func:`pick`): among the candidates whose validity is within ``--validity-margin``
(default 0.05) of the best, the one with the smallest step error; ties by validity. Validity
first, because a frame that breaks the chain is useless whatever its time scale; the step error
then separates the valid ones by whether they honour Δt. Test proteins are never used here
(they are for the model card, after the pick).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from rollout_check import DEFAULT_MANIFEST, check_protein  # noqa: E402

from openmm_starmd.checkpoints import load_model  # noqa: E402
from openmm_starmd.data import load_shard  # noqa: E402


def score(rows: list[dict]) -> dict:
    """Validity and step error (module docstring) of one candidate's rollout rows.

    Parameters
    ----------
    rows : list of dict
        Rows of :func:`rollout_check.check_protein` (``ca_validity``, ``step_A``, ``ref_step_A``).

    Returns
    -------
    dict with ``validity`` (mean, in [0, 1]) and ``step_error`` (mean |ln(step / MD step)| over the
    rows that have both steps; NaN when none has).
    """
    validity = float(np.mean([r["ca_validity"] for r in rows]))
    errs = [abs(math.log(r["step_A"] / r["ref_step_A"])) for r in rows
            if r.get("ref_step_A") and r.get("step_A") and r["step_A"] > 0]
    return {"validity": validity, "step_error": float(np.mean(errs)) if errs else float("nan")}


def pick(candidates: list[dict], validity_margin: float = 0.05) -> dict:
    """The rule of the module docstring.

    Parameters
    ----------
    candidates : list of dict
        Each with ``validity`` and ``step_error`` (and anything else, returned unchanged).
    validity_margin : float
        Candidates within this much of the best validity compete on step error.

    Returns
    -------
    dict, the chosen candidate.
    """
    if not candidates:
        raise ValueError("no candidates to pick from")
    best = max(c["validity"] for c in candidates)
    close = [c for c in candidates if c["validity"] >= best - validity_margin]

    def key(c):
        err = c["step_error"]
        return (math.inf if math.isnan(err) else err, -c["validity"])

    return min(close, key=key)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="model files to compare (e.g. the --export of each training run)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    p.add_argument("--split", default="validation", help="split whose proteins decide (never 'test')")
    p.add_argument("--dt-ns", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="rollout frame spacings, ns")
    p.add_argument("--t-min", type=float, nargs="+", default=[None],
                   help="last diffusion times to try with every model (default: each model's own)")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--validity-margin", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every candidate's rows and scores, and the pick, here")
    args = p.parse_args(argv)
    if args.split == "test":
        p.error("--split test: the test proteins are for reporting the chosen model, not for choosing it; "
                "use the validation split (or training proteins).")
    torch.set_num_threads(args.threads)
    with open(args.manifest) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(args.manifest))
    entries = [e for e in manifest["shards"] if e["split"] == args.split and e["replica"] == 0]
    if not entries:
        p.error(f"no replica-0 shard of split {args.split!r} in {args.manifest}; see `python training/prepare.py --summary`.")
    shards = [load_shard(os.path.join(base, e["file"]), e["sha256"]) for e in entries]
    candidates = []
    for path in args.models:
        try:
            loaded = load_model(path)
        except (FileNotFoundError, ValueError) as exc:
            p.error(f"{path}: {exc}")
        for t_min in args.t_min:
            t_used = loaded.sampling_config.t_min if t_min is None else t_min
            rows = [check_protein(loaded, shard, dt, args.frames, 1, args.seed, None, t_min=t_min)
                    for shard in shards for dt in args.dt_ns]
            cand = {"model": path, "t_min": t_used, **score(rows), "rows": rows}
            candidates.append(cand)
            print(f"{path}  t_min {t_used:g}: validity {cand['validity']:.3f}, step error {cand['step_error']:.3f}",
                  flush=True)
    chosen = pick(candidates, args.validity_margin)
    print("\n| model | t_min | Cα validity | step error, mean abs ln(step / MD step) | chosen |")
    print("|---|---|---|---|---|")
    for c in candidates:
        mark = "**yes**" if c is chosen else ""
        print(f"| {c['model']} | {c['t_min']:g} | {c['validity']:.3f} | {c['step_error']:.3f} | {mark} |")
    print(f"\nchosen: {chosen['model']} with t_min {chosen['t_min']:g} (proteins: "
          f"{', '.join(e['protein'] for e in entries)}; Δt {args.dt_ns} ns; {args.frames} frames)")
    if args.json:
        out = {"rule": f"validity within {args.validity_margin} of the best, then the smallest step error",
               "split": args.split, "proteins": [e["protein"] for e in entries], "dt_ns": args.dt_ns,
               "frames": args.frames, "candidates": candidates,
               "chosen": {"model": chosen["model"], "t_min": chosen["t_min"]}}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
