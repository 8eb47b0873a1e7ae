"""training/model_card.py: the facts table comes from the model file and the manifest."""
from __future__ import annotations

import json

from training_helpers import load_training_module

train = load_training_module("train")
model_card = load_training_module("model_card")
from test_train import manifest, tiny_config  # noqa: E402,F401  (the real short-MD shards and a tiny run)


def test_facts_of_a_trained_model(manifest, tmp_path):  # noqa: F811
    out = tmp_path / "model.pt"
    cfg = tiny_config(manifest, tmp_path / "run", steps=2, export=str(out), lr=2e-4)
    train.train(cfg, log=lambda *a, **k: None)
    rows = dict(model_card.facts(str(out), str(manifest)))
    entries = [e for e in json.loads(manifest.read_text())["shards"]]
    train_ns = sum(e["frames"] * e["spacing_ns"] for e in entries if e["split"] == "train")
    assert f"{train_ns:.3g} ns in all" in rows["data"]
    # force field and temperature come from the shards themselves
    from openmm_starmd.data import load_shard

    shard = load_shard(manifest.parent / next(e["file"] for e in entries if e["split"] == "train"))
    assert f"({shard.forcefield}, {shard.temperature_k:g} K)" in rows["data"]
    assert "after 2 of 2 steps" in rows["weights"] and " MB" in rows["weights"]
    n_params = sum(p.numel() for p in train.StarMDNetwork(cfg.model_config()).parameters())
    assert f"{n_params / 1e6:.2f} M parameters" in rows["architecture"]
    # the command reproduces the run's non-default options, and only those
    cmd = rows["command"]
    assert "--steps 2" in cmd and "--lr 0.0002" in cmd and "--resume" not in cmd and "--manifest" not in cmd
    assert "--batch-size" not in cmd or f"--batch-size {cfg.batch_size}" in cmd
    text = model_card.markdown(list(rows.items()))
    assert text.startswith("| | |\n|---|---|\n| architecture |")


def test_train_command_lists_only_changed_options():
    cmd = model_card.train_command({"steps": 8000, "lr": 1e-4, "contextual_noise": False,
                                    "model": {"width": 64, "blocks": 4}, "loss": {}, "resume": "auto"})
    assert cmd == "python training/train.py --steps 8000 --no-contextual-noise --model width=64 blocks=4"


def test_facts_of_a_model_whose_training_shards_changed_since(manifest, tmp_path):  # noqa: F811
    """A backfilled record (training/export.py) has no ns for shards no longer in the manifest: the
    table still comes out and says so instead of failing."""
    import torch

    export = load_training_module("export")
    cfg = tiny_config(manifest, tmp_path / "run", steps=1)
    trainer = train.train(cfg, log=lambda *a, **k: None)
    payload = torch.load(trainer.out / "checkpoint.pt", weights_only=True)
    payload["coverage"] = json.dumps({k: v for k, v in json.loads(payload["coverage"]).items() if k != "train_data"})
    payload["data"]["shards"] = json.dumps([[p, r, "0" * 64] for p, r, _ in json.loads(payload["data"]["shards"])])
    torch.save(payload, tmp_path / "old.pt")
    model = export.export(tmp_path / "old.pt", tmp_path / "old_model.pt")
    rows = dict(model_card.facts(str(model), str(manifest)))
    assert "trajectories no longer in the manifest" in rows["data"]


def test_restarted_training_trajectories_are_counted(manifest, tmp_path):  # noqa: F811
    """A training shard with a reconstructed restart (training/restore_md.py) is named in the data row."""
    import shutil

    from openmm_starmd.data import load_shard, save_shard

    shutil.copytree(manifest.parent, tmp_path / "data")
    path = tmp_path / "data" / manifest.name
    m = json.loads(path.read_text())
    entry = next(e for e in m["shards"] if e["split"] == "train")
    shard = load_shard(str(path.parent / entry["file"]))
    shard.provenance = dict(shard.provenance, restarts=[{"frame": shard.n_frames // 2, "kind": "reconstructed"}])
    entry["sha256"] = save_shard(str(path.parent / entry["file"]), shard)
    path.write_text(json.dumps(m))
    out = tmp_path / "model.pt"
    train.train(tiny_config(path, tmp_path / "run", steps=1, export=str(out)), log=lambda *a, **k: None)
    n_train = sum(e["split"] == "train" for e in m["shards"])
    assert f"1 of {n_train} trajectories have a reconstructed restart" in dict(model_card.facts(str(out), str(path)))["data"]
    rows = dict(model_card.facts(str(out), str(manifest)))  # the original shards: none restarted
    assert "reconstructed restart" not in rows["data"]
