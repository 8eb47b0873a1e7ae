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


def _floor_manifest(changes=None):
    """Manifest entries meeting the floor exactly: 7 train/validation proteins x 1 and 3 test x 2 at 4 ns."""
    shards = []
    for i in range(10):
        split = "test" if i < 3 else ("validation" if i == 3 else "train")
        for r in range(2 if split == "test" else 1):
            shards.append(dict(protein=f"p{i}", replica=r, split=split, residues=30 + i, frames=400,
                               spacing_ns=0.01, total_ns=4.0))
    for (name, replica), change in (changes or {}).items():
        for e in shards:
            if e["protein"] == name and e["replica"] == replica:
                e.update(change)
    return {"shards": [e for e in shards if e.get("total_ns") is not None]}


def test_floor_status_counts_what_the_data_issue_asks_for():
    met = prepare.floor_status(_floor_manifest())
    assert met["met"] and len(met["counted"]) == 10 and len(met["test_counted"]) == 3 and met["missing_ns"] == 0
    assert "MET" in prepare.floor_line(met)

    # one training trajectory 1.5 ns short, one test replica missing altogether
    short = prepare.floor_status(_floor_manifest({("p5", 0): dict(total_ns=2.5, frames=250),
                                                    ("p1", 1): dict(total_ns=None)}))
    assert not short["met"] and len(short["counted"]) == 8 and len(short["test_counted"]) == 2
    assert short["missing_ns"] == pytest.approx(1.5 + 4.0)
    assert "about 5.5 ns of MD to go" in prepare.floor_line(short)

    # a protein outside 10-70 residues or at another spacing never counts, and is named
    odd = prepare.floor_status(_floor_manifest({("p6", 0): dict(residues=120), ("p7", 0): dict(spacing_ns=0.1)}))
    assert not odd["met"] and set(odd["problems"]) == {"p6", "p7"}
    assert odd["missing_ns"] == pytest.approx(2 * 4.0)  # two more proteins of 4 ns are needed
    # an 11th protein far from counting adds nothing: the floor needs 10 proteins, the closest ones
    extra = _floor_manifest({("p5", 0): dict(total_ns=2.5, frames=250)})
    extra["shards"].append(dict(extra["shards"][-1], protein="p_new", split="train", total_ns=0.7, frames=70))
    assert prepare.floor_status(extra)["missing_ns"] == pytest.approx(1.5)  # p5 only, not p_new's 3.3
    line = prepare.floor_line(odd)
    assert "p6 cannot count: 120 residues" in line and "p7 cannot count: frame spacing [0.1] ns" in line


def test_check_floor_exit_status(tmp_path, capsys):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_floor_manifest({("p0", 1): dict(total_ns=3.99, frames=399)})))
    assert prepare.main(["--no-build", "--manifest", str(path), "--check-floor"]) == 3
    assert "not met: 9 of 10 proteins count, 2 of 3 test proteins" in capsys.readouterr().out
    path.write_text(json.dumps(_floor_manifest()))
    assert prepare.main(["--no-build", "--manifest", str(path), "--check-floor"]) == 0
