#!/usr/bin/env python
"""The facts table of a model card, read from the model file and the manifest, never typed by hand.

    python training/model_card.py openmm_starmd/data/starmd_default.pt > /tmp/facts.md

Prints a two-column Markdown table: architecture (the network's config and parameter count),
diffusion schedule, recommended sampler settings, weights (EMA decay, steps, file size), the
training data (every trajectory the model recorded in its metadata, with residues, ns and frame
spacing, force field and temperature from the shards, and the Δt range its windows covered), the
proteins it never saw (the manifest's validation and test splits), the loss settings, the final
validation loss, and the ``train.py`` command that reproduces the run (the options that differ
from the defaults). The measured sections of a card (what the model does) come from
``denoise_check.py``, ``rollout_check.py`` and the benchmarks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from config import TrainConfig  # noqa: E402

from openmm_starmd.checkpoints import bundled_model_path, load_model  # noqa: E402
from openmm_starmd.data import load_shard  # noqa: E402

DEFAULT_MANIFEST = os.path.join(HERE, "data", "manifest.json")


def train_command(train_config: dict) -> str:
    """``python training/train.py`` with the options of ``train_config`` that differ from the defaults.

    Dictionary options (``model``, ``diffusion``, ``loss``) become ``--model KEY=VALUE ...``;
    booleans ``--flag`` / ``--no-flag``; run bookkeeping (``resume``, ``progress``, ``manifest``,
    ``device``) is left out.
    """
    default = dataclasses.asdict(TrainConfig())
    skip = {"resume", "progress", "manifest", "device", "stop_after", "allow_data_change"}
    parts = ["python training/train.py"]
    for key, value in train_config.items():
        if key in skip or key not in default or value == default[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, dict):
            items = [f"{k}={v}" for k, v in value.items() if default[key].get(k) != v]
            if items:
                parts.append(f"{flag} " + " ".join(items))
        elif isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def facts(model_path: str | None, manifest_path: str = DEFAULT_MANIFEST) -> list[tuple[str, str]]:
    """(label, Markdown text) rows of the facts table (module docstring)."""
    loaded = load_model(model_path)
    meta = loaded.metadata
    net = loaded.model
    mc = net.config
    n_params = sum(p.numel() for p in net.parameters())
    rows = []
    anchor = f"x0 anchor `{mc.x0_anchor}`"
    if mc.x0_anchor == "posterior":
        anchor += f" (history mean of {mc.anchor_frames} frames"
        if mc.anchor_prior_dt_exponent:
            anchor += f", prior widths × (Δt / {mc.anchor_prior_dt_ref_ns:g} ns)^{mc.anchor_prior_dt_exponent:g}"
        anchor += ")"
    layers = f"{mc.frame_layers} per-frame + {mc.joint_layers} {mc.attention} layers" if mc.frame_layers else f"{mc.joint_layers} {mc.attention} layer(s)"
    rows.append(("architecture", f"{mc.blocks} blocks of {layers} (spatio-temporal attention), width {mc.width}, "
                                 f"{mc.heads} heads, {mc.query_points} query / {mc.value_points} value points per head, "
                                 f"window L = {mc.window}, {anchor}; {n_params / 1e6:.2f} M parameters"))
    d = loaded.diffuser.config
    rows.append(("diffusion", ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(d).items())))
    rows.append(("sampling default", ", ".join(f"{k} {v}" for k, v in loaded.sampling_config.to_dict().items())))
    file = model_path if model_path and os.path.exists(model_path) else bundled_model_path(model_path or "default")
    size = os.path.getsize(file) / 1e6
    rows.append(("weights", f"{meta.get('weights', '?')} (decay {meta.get('ema_decay')}) after {meta.get('steps')} of "
                            f"{meta.get('total_steps')} steps; {size:.1f} MB"))

    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest_path))
    by_sha = {e["sha256"]: e for e in manifest["shards"]}
    data = meta.get("train_data")
    if data:
        per = {}
        extra = set()
        restarted = 0
        for t in data:
            p = per.setdefault(t["protein"], {"ns": 0.0, "replicas": 0, "residues": None})
            p["ns"] += t["total_ns"] or 0.0  # None: an older model whose shard has changed since
            p["replicas"] += 1
            e = by_sha.get(t["sha256"])
            if e is not None:
                p["residues"] = e["residues"]
                sh = load_shard(os.path.join(base, e["file"]))
                extra.add((sh.forcefield, sh.temperature_k))
                restarted += bool(sh.provenance.get("restarts"))
        total = sum(p["ns"] for p in per.values())
        prot = "; ".join(f"{n} ({p['residues'] or '?'} res, {p['ns']:.3g} ns" +
                         (f", {p['replicas']} replicas)" if p["replicas"] > 1 else ")") for n, p in per.items())
        spacing = sorted({t["spacing_ns"] for t in data if t["spacing_ns"] is not None})
        unknown = sum(t["total_ns"] is None for t in data)
        ff = "; ".join(f"{f}, {t:g} K" for f, t in sorted(extra, key=str)) or "force field not in this manifest"
        rows.append(("data", f"{len(per)} training proteins, {total:.3g} ns in all, frames every "
                             f"{', '.join(f'{s * 1000:g}' for s in spacing)} ps ({ff}): {prot}" +
                             (f" ({unknown} trajectories no longer in the manifest: their ns are not counted)"
                              if unknown else "") +
                             (f"; {restarted} of {len(data)} trajectories have a reconstructed restart (side chains "
                              "rebuilt on their backbone on a new machine, training/restore_md.py), which training "
                              "windows below Δt = 1 ns never span" if restarted else "")))
    else:
        rows.append(("data", f"training proteins {', '.join(meta.get('train_proteins', []))} (this model file "
                             "predates the per-trajectory record)"))
    lo, hi = meta.get("trained_dt_ns", [None, None])
    if lo is not None:
        rows.append(("Δt covered", f"{lo:g}–{hi:g} ns (the integrator warns outside it)"))
    trained = set(meta.get("train_proteins", []))
    unseen = {}
    for e in manifest["shards"]:
        if e["split"] in ("validation", "test") and e["protein"] not in trained:
            unseen.setdefault(e["split"], set()).add(e["protein"])
    rows.append(("never seen", "; ".join(f"{s}: {', '.join(sorted(v))}" for s, v in sorted(unseen.items()))))
    tc = meta.get("train_config") or {}
    if tc:
        loss = tc.get("loss") or {}
        rows.append(("loss", (", ".join(f"{k} {v}" for k, v in loss.items()) or "LossConfig defaults") +
                     f"; diffusion times {tc.get('t_sampling', 'uniform')}"))
        rows.append(("command", f"`{train_command(tc)}`"))
    if meta.get("val_loss") is not None:
        rows.append(("validation loss", f"{meta['val_loss']:.4f} (EMA weights, last validation)"))
    return rows


def markdown(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model file (default: the bundled default model)")
    p.add_argument("--manifest", default=DEFAULT_MANIFEST)
    a = p.parse_args(argv)
    try:
        print(markdown(facts(a.model, a.manifest)))
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
