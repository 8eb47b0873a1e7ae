"""training/prepare.py: MD runs -> shards + manifest, split by protein, growing runs read safely.

Uses the real killed-and-resumed 2M9I run of ``short_run``, copied into an md root as three
"proteins" (one of them with two replicas) so splits and replica counts can be checked.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from openmm_starmd.data import load_shard
from training_helpers import load_training_module

prepare = load_training_module("prepare")


@pytest.fixture()
def md_root(short_run, tmp_path):
    root = tmp_path / "md"
    for name, reps in (("protA", 1), ("protB", 1), ("protT", 2)):
        for r in range(reps):
            shutil.copytree(short_run["out"], root / name / f"r{r}")
    plan = {"proteins": {"protA": {"file": "x", "split": "train"}, "protB": {"file": "x", "split": "validation"},
                         "protT": {"file": "x", "split": "test", "replicas": 2}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (root / "queue.log").write_text("not a run")
    return root


def _build(tmp_path, md_root, **kw):
    return prepare.build(str(md_root), str(tmp_path / "data" / "shards"), str(tmp_path / "data" / "manifest.json"),
                         str(tmp_path / "plan.json"), log=lambda *a: None, **kw)


def test_manifest_and_shards(tmp_path, md_root, short_run):
    manifest = _build(tmp_path, md_root)
    entries = {(e["protein"], e["replica"]): e for e in manifest["shards"]}
    assert set(entries) == {("protA", 0), ("protB", 0), ("protT", 0), ("protT", 1)}
    assert {k[0]: e["split"] for k, e in entries.items()} == {"protA": "train", "protB": "validation", "protT": "test"}
    e = entries[("protT", 1)]
    assert (e["residues"], e["frames"], e["spacing_ns"]) == (34, 24, pytest.approx(0.0002))
    assert e["total_ns"] == pytest.approx(0.0048) and e["complete"]
    shard = load_shard(str(tmp_path / "data" / e["file"]), sha256=e["sha256"])
    assert shard.name == "protT" and shard.replica == 1 and shard.forcefield.startswith("amber99sbildn")
    assert shard.provenance["seed"] == 7
    # the shard holds the backbone of the DCD frames
    import mdtraj as md

    t = md.load_dcd(str(short_run["out"] / "traj.dcd"), top=str(short_run["out"] / "topology.pdb"))
    ca = t.xyz[:, t.topology.select("name CA")]
    np.testing.assert_allclose(shard.coords_nm[:, :, 1], ca, atol=1e-5)


def test_growing_run_reads_only_checkpointed_frames(tmp_path, md_root):
    """A run still being written: DCD ahead of its checkpoint (as right after a kill)."""
    run = md_root / "protA" / "r0"
    ckpt = json.loads((run / "checkpoint.json").read_text())
    ckpt["frames"] = 16
    (run / "checkpoint.json").write_text(json.dumps(ckpt))
    (run / "done").unlink()
    manifest = _build(tmp_path, md_root)
    e = next(e for e in manifest["shards"] if e["protein"] == "protA")
    assert e["frames"] == 16 and not e["complete"]


def test_incremental_rebuild_keeps_unchanged_shards(tmp_path, md_root):
    first = _build(tmp_path, md_root)
    shard = tmp_path / "data" / "shards" / "protB_r0.npz"
    mtime = shard.stat().st_mtime_ns
    second = _build(tmp_path, md_root)
    assert shard.stat().st_mtime_ns == mtime
    assert [e["sha256"] for e in first["shards"]] == [e["sha256"] for e in second["shards"]]


def test_summary_table_and_dt_range(tmp_path, md_root):
    manifest = _build(tmp_path, md_root)
    text = prepare.summary(manifest, window=4)
    assert "protT" in text and "test" in text
    assert "train 1" in text and "validation 1" in text and "test 1" in text
    # 24 frames at 0.2 ps, windows of 4: stride up to 7 frames -> 1.4 ps
    assert "L=4: 0.0002 ns to 0.0014 ns" in text
    # and the shortest training windows, 2 frames: stride up to 23 frames -> 4.6 ps
    assert "L=2: 0.0002 ns to 0.0046 ns" in prepare.summary(manifest, window=4, min_window=2)


def test_cli_summary(tmp_path, md_root, capsys):
    prepare.main(["--md-root", str(md_root), "--out", str(tmp_path / "s"), "--manifest", str(tmp_path / "m.json"),
                  "--plan", str(tmp_path / "plan.json"), "--summary", "--verify"])
    out = capsys.readouterr().out
    assert "verified 4 shards" in out and "protA" in out


def test_broken_run_is_skipped_not_half_written(tmp_path, md_root):
    (md_root / "protB" / "r0" / "traj.dcd").write_bytes(b"")
    logs = []
    manifest = prepare.build(str(md_root), str(tmp_path / "d" / "shards"), str(tmp_path / "d" / "manifest.json"),
                             str(tmp_path / "plan.json"), log=logs.append)
    assert "protB" not in {e["protein"] for e in manifest["shards"]}
    assert any("skipped protB/r0" in l and "file is empty" in l for l in logs)
    assert not (tmp_path / "d" / "shards" / "protB_r0.npz").exists()
    assert not [p for p in (tmp_path / "d" / "shards").iterdir() if "tmp" in p.name]
