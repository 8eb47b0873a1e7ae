"""Export the EMA weights of a training checkpoint as a model file, without training further.

    python training/export.py training/runs/default/checkpoint.pt model.pt
    python training/export.py CKPT model.pt --sampling t_min=0.05     # recommended sampler settings

Useful when a run was stopped early (SIGTERM / --stop-after) and its end-of-training ``--export``
never happened. The model file is what ``openmm_starmd.checkpoints.load_model`` and
``StarMDIntegrator(model=...)`` read; its metadata records the step it came from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from config import _KeyValue  # noqa: E402  (train.py's KEY=VALUE flag parsing)
from train import load_training_checkpoint  # noqa: E402

from openmm_starmd.checkpoints import save_model  # noqa: E402
from openmm_starmd.model.network import StarMDNetwork  # noqa: E402
from openmm_starmd.sampling import SamplingConfig  # noqa: E402


def _train_data_from_fingerprint(payload: dict, manifest_path: str) -> list[dict]:
    """The per-trajectory record of checkpoints written before train.py stored one: (protein,
    replica, sha256) from the checkpoint's data fingerprint, with frames and ns from the run's
    manifest where a shard of that sha256 is still listed (None where it has changed since)."""
    fingerprint = json.loads(payload["data"]["shards"])
    try:
        with open(manifest_path) as fh:
            by_sha = {e["sha256"]: e for e in json.load(fh)["shards"]}
    except (OSError, ValueError, KeyError):
        by_sha = {}
    out = []
    for protein, replica, sha in fingerprint:
        e = by_sha.get(sha, {})
        frames, spacing = e.get("frames"), e.get("spacing_ns")
        out.append({"protein": protein, "replica": int(replica), "frames": frames, "spacing_ns": spacing,
                    "total_ns": e.get("total_ns", frames * spacing if frames and spacing else None), "sha256": sha})
    return out


def export(checkpoint, out, note: str | None = None, sampling: dict | None = None) -> Path:
    """Write the EMA weights of ``checkpoint`` to ``out``.

    ``sampling`` overrides fields of the recommended :class:`SamplingConfig` stored with the model
    (default: the diffusion config's t_min and contextual noise); load_model() and the integrator
    use it unless the user passes their own.
    """
    payload = load_training_checkpoint(checkpoint)
    cfg = payload["config"]
    d = cfg.diffusion_config()
    net = StarMDNetwork(cfg.model_config(), d)
    net.load_state_dict(payload["ema"]["weights"])
    metadata = {
        "weights": "ema", "ema_decay": cfg.ema_decay, "steps": int(payload["step"]), "total_steps": cfg.steps,
        "train_config": cfg.to_dict(), "exported_from": str(checkpoint),
    }
    if "coverage" in payload:  # training proteins and the Δt range their windows covered
        metadata.update(json.loads(payload["coverage"]))
    if "train_data" not in metadata:
        metadata["train_data"] = _train_data_from_fingerprint(payload, cfg.manifest)
    if note:
        metadata["note"] = note
    # from_dict names unknown keys and SamplingConfig checks the values
    sampling_config = SamplingConfig.from_dict({"t_min": d.t_min, "context_tau_max": d.context_tau_max, **(sampling or {})})
    return save_model(out, net.eval(), d, sampling_config, metadata)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint.pt")
    p.add_argument("out", help="model file to write")
    p.add_argument("--note", default=None, help="free text stored in the model's metadata")
    p.add_argument("--sampling", nargs="+", action=_KeyValue, metavar="KEY=VALUE", default=None,
                   help="recommended sampler settings stored with the model (SamplingConfig fields), e.g. t_min=0.05 steps=20")
    a = p.parse_args(argv)
    try:
        path = export(a.checkpoint, a.out, a.note, a.sampling)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
