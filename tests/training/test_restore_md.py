"""training/restore_md.py: a fresh clone continues the committed MD instead of starting it again.

Uses the real 2M9I run of ``short_run`` (24 frames, 0.2 ps apart). ``prepare.build`` exports its
state next to its shard; the run directory is then thrown away, as on a new machine, and restored:

- exactly, from the exported state: the continued frames equal those of the same run continued
  on the original machine (same platform, one thread, same reseeding);
- by reconstruction, with no state: side chains rebuilt on the shard's last backbone; the MD goes
  on, the shard keeps its frames, and the restart is recorded in its provenance.
"""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from openmm_starmd.data import load_shard
from training_helpers import SHORT_ARGS, load_training_module, run_simulate

prepare = load_training_module("prepare")
restore_md = load_training_module("restore_md")
simulate = load_training_module("simulate")
run_queue = load_training_module("run_queue")
junction_check = load_training_module("junction_check")


def _args(pdb, out):
    return simulate.build_parser().parse_args([str(pdb), "--out", str(out), *SHORT_ARGS])


@pytest.fixture(scope="module")
def exported(short_run, tmp_path_factory):
    """The short run in an md root, built into shards with its state exported."""
    base = tmp_path_factory.mktemp("restore")
    shutil.copytree(short_run["out"], base / "md" / "2M9I" / "r0")
    manifest = prepare.build(str(base / "md"), str(base / "data" / "shards"), str(base / "data" / "manifest.json"),
                             None, log=lambda *a: None, state_root=str(base / "state"))
    return dict(base=base, manifest=manifest, pdb=short_run["pdb"])


def _continue_and_build(run_dir, pdb, ns, data_dir, md_root):
    run_simulate(pdb, run_dir, "--ns", str(ns))
    return prepare.build(str(md_root), str(data_dir / "shards"), str(data_dir / "manifest.json"), None,
                         log=lambda *a: None)


def test_state_exported_with_shard(exported):
    state = exported["base"] / "state" / "2M9I" / "r0"
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint.json.gz", "done", "record.json", "start.pdb",
                                                       "system.xml.gz", "topology.pdb"]
    ckpt = json.loads(gzip.open(state / "checkpoint.json.gz").read())
    assert ckpt["frames"] == exported["manifest"]["shards"][0]["frames"] == 24
    # deterministic gzip: exporting again changes no byte
    before = (state / "checkpoint.json.gz").read_bytes()
    prepare.build(str(exported["base"] / "md"), str(exported["base"] / "data" / "shards"),
                  str(exported["base"] / "data" / "manifest.json"), None, log=lambda *a: None,
                  state_root=str(exported["base"] / "state"))
    assert (state / "checkpoint.json.gz").read_bytes() == before


def test_exact_restore_continues_the_same_trajectory(exported, tmp_path):
    base, pdb = exported["base"], exported["pdb"]
    # reference: the original machine continues its own run from 24 to 32 frames
    ref_dir = tmp_path / "ref" / "2M9I" / "r0"
    shutil.copytree(base / "md" / "2M9I" / "r0", ref_dir)
    ref = _continue_and_build(ref_dir, pdb, 0.0064, tmp_path / "ref_data", tmp_path / "ref")
    # fresh machine: only the shard, manifest and committed state
    fresh = tmp_path / "fresh" / "2M9I" / "r0"
    what = restore_md.ensure_run_dir(str(fresh), _args(pdb, fresh), "2M9I", 0,
                                     str(base / "data" / "manifest.json"), str(base / "state"), log=lambda *a: None)
    assert what == "exact"
    assert simulate.read_checkpoint_frames(str(fresh)) == 24
    assert restore_md.ensure_run_dir(str(fresh), _args(pdb, fresh), "2M9I", 0, str(base / "data" / "manifest.json"),
                                     str(base / "state")) == "present"
    shutil.copytree(base / "data", tmp_path / "fresh_data")
    # a finished run stays finished on the clone (the manifest's "complete", which evaluations need)
    assert (fresh / "done").exists()
    again = prepare.build(str(tmp_path / "fresh"), str(tmp_path / "fresh_data" / "shards"),
                          str(tmp_path / "fresh_data" / "manifest.json"), None, log=lambda *a: None)
    assert again["shards"][0]["complete"] and again["shards"][0]["frames"] == 24
    got = _continue_and_build(fresh, pdb, 0.0064, tmp_path / "fresh_data", tmp_path / "fresh")
    (e_ref,), (e_got,) = ref["shards"], got["shards"]
    assert e_ref["frames"] == e_got["frames"] == 32
    a = load_shard(str(tmp_path / "ref_data" / e_ref["file"]))
    b = load_shard(str(tmp_path / "fresh_data" / e_got["file"]))
    np.testing.assert_array_equal(a.coords_nm[:24], b.coords_nm[:24])
    # the same microstate, the same reseeded noise, one CPU thread: the same frames
    np.testing.assert_allclose(a.coords_nm[24:], b.coords_nm[24:], atol=1e-4)
    np.testing.assert_allclose(b.time_ns, np.arange(1, 33) * 0.0002)
    assert b.provenance["restores"][0]["kind"] == "exact" and "restarts" not in b.provenance


def test_reconstructed_restore_keeps_backbone_and_records_restart(exported, tmp_path):
    base, pdb = exported["base"], exported["pdb"]
    old = load_shard(str(base / "data" / exported["manifest"]["shards"][0]["file"]))
    fresh = tmp_path / "md" / "2M9I" / "r0"
    (fresh.parent).mkdir(parents=True)
    fresh.mkdir()  # an empty directory left by a failed start is replaced
    what = restore_md.ensure_run_dir(str(fresh), _args(pdb, fresh), "2M9I", 0, str(base / "data" / "manifest.json"),
                                     str(tmp_path / "no_state"), log=lambda *a: None)
    assert what == "reconstructed"
    record = json.loads((fresh / "record.json").read_text())
    (restart,) = record["restarts"]
    assert restart["frame"] == 24 and restart["kind"] == "reconstructed"
    assert restart["backbone_rms_deviation_nm"] < 0.02
    assert np.isfinite(restart["potential_energy_kj"])
    # the restored state's backbone sits on the shard's last frame
    import mdtraj as md

    top = md.load(str(fresh / "topology.pdb")).topology
    ckpt = json.loads((fresh / "checkpoint.json").read_text())
    import openmm as mm

    state = mm.XmlSerializer.deserialize(ckpt["state_xml"])
    xyz = np.asarray(state.getPositions(asNumpy=True).value_in_unit(mm.unit.nanometer))
    ca = xyz[top.select("name CA")]
    assert np.sqrt(np.mean(np.sum((ca - old.coords_nm[-1, :, 1]) ** 2, -1))) < 0.02
    assert state.getTime().value_in_unit(mm.unit.picosecond) == pytest.approx(24 * 0.2)
    shutil.copytree(base / "data", tmp_path / "data")
    got = _continue_and_build(fresh, pdb, 0.0056, tmp_path / "data", tmp_path / "md")
    (entry,) = got["shards"]
    shard = load_shard(str(tmp_path / "data" / entry["file"]), entry["sha256"])
    assert shard.n_frames == 28 and np.all(np.isfinite(shard.coords_nm))
    np.testing.assert_array_equal(shard.coords_nm[:24], old.coords_nm)
    assert shard.provenance["restarts"][0]["frame"] == 24
    text = prepare.summary(got, base=str(tmp_path / "data"))
    assert "1 trajectories have a reconstructed restart" in text and "2M9I/r0 (frame 24)" in text
    # the first frame after the restart is one ordinary 0.2-ps step away, not a jump
    step = np.sqrt(np.mean(np.sum((shard.coords_nm[24, :, 1] - shard.coords_nm[23, :, 1]) ** 2, -1)))
    assert step < 0.05
    # junction_check counts exactly the pairs that span frame 24, and plots them
    (row,) = junction_check.junction_stats(shard.coords_nm, shard.residue_mask, [24], [1])
    assert (row["n_spanning"], row["n_ordinary"]) == (1, 26)
    (row3,) = junction_check.junction_stats(shard.coords_nm, shard.residue_mask, [24], [3])
    assert (row3["n_spanning"], row3["n_ordinary"]) == (3, 22)
    assert junction_check.main(["--manifest", str(tmp_path / "data" / "manifest.json"), "--lags", "1", "3",
                                "--png", str(tmp_path / "j.png")]) == 0
    assert (tmp_path / "j.png").stat().st_size > 10_000


def test_fresh_clone_keeps_shards_it_has_no_md_for(exported, tmp_path):
    base = exported["base"]
    shutil.copytree(base / "data", tmp_path / "data")
    (tmp_path / "md").mkdir()
    before = (tmp_path / "data" / "manifest.json").read_bytes()
    manifest = prepare.build(str(tmp_path / "md"), str(tmp_path / "data" / "shards"),
                             str(tmp_path / "data" / "manifest.json"), None, log=lambda *a: None)
    assert [(e["protein"], e["frames"]) for e in manifest["shards"]] == [("2M9I", 24)]
    # nothing changed, so not a byte of the manifest (a release in progress records its sha256)
    assert (tmp_path / "data" / "manifest.json").read_bytes() == before


def test_no_shard_means_fresh_start(exported, tmp_path):
    run_dir = tmp_path / "md" / "other" / "r0"
    assert restore_md.ensure_run_dir(str(run_dir), _args(exported["pdb"], run_dir), "other", 0,
                                     str(exported["base"] / "data" / "manifest.json"), str(tmp_path)) == "fresh"
    assert not run_dir.exists()


def test_changed_settings_refused(exported, tmp_path):
    fresh = tmp_path / "md" / "2M9I" / "r0"
    args = _args(exported["pdb"], fresh)
    args.temperature = 310.0
    with pytest.raises(restore_md.RestoreError, match="temperature_k"):
        restore_md.ensure_run_dir(str(fresh), args, "2M9I", 0, str(exported["base"] / "data" / "manifest.json"),
                                  str(tmp_path / "no_state"))
    assert not fresh.exists()


def test_claim_waits_for_a_lock_being_written(tmp_path):
    run_dir = tmp_path / "p" / "r0"
    lock = tmp_path / "p" / "r0.lock"
    lock.parent.mkdir()
    lock.write_text("")  # another worker created it and has not written its pid yet
    assert not run_queue.claim(str(run_dir))
    import os
    import time

    old = time.time() - 3600
    os.utime(lock, (old, old))  # ... or died right there, long ago
    assert run_queue.claim(str(run_dir))
    assert lock.read_text() == str(os.getpid())


def test_queue_on_a_fresh_clone_restores_then_extends(exported, tmp_path):
    """run_queue with restore=(manifest, state): the committed trajectory is continued, not restarted."""
    base = exported["base"]
    short = [a for a in SHORT_ARGS if a not in ("--ns", "0.0048")]
    plan = {"proteins": {"2M9I": {"file": str(exported["pdb"]), "split": "train"}},
            "stages": [{"proteins": ["2M9I"], "ns": 0.0056, "chunk_ns": 0.0056}], "frame_ps": 0.2,
            "simulate_args": short}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    root = tmp_path / "md"
    status = run_queue.run_queue(str(tmp_path / "plan.json"), str(root), [], worker="t",
                                 restore=(str(base / "data" / "manifest.json"), str(base / "state")))
    assert status["failed"] == {}
    record = json.loads((root / "2M9I" / "r0" / "record.json").read_text())
    assert record["restores"][0]["kind"] == "exact" and record["dcd_first_frame"] == 24
    assert simulate.read_checkpoint_frames(str(root / "2M9I" / "r0")) == 28
    assert record["segments"][-1]["start_frame"] == 24  # production went on from frame 24


def test_allatom_sample_travels_with_the_state(exported, tmp_path):
    """Test trajectories keep up to 100 all-atom frames with their state; a restored run offers
    them to the evaluation when it has no frames of its own yet."""
    base = exported["base"]
    run_dir = base / "md" / "2M9I" / "r0"
    state = tmp_path / "state" / "2M9I" / "r0"
    shutil.copytree(base / "state" / "2M9I" / "r0", state)
    ckpt_text = (run_dir / "checkpoint.json").read_text()
    assert restore_md.export_allatom_sample(str(run_dir), ckpt_text, str(state))
    meta = json.loads((state / "allatom_sample.json").read_text())
    assert (meta["frames"], meta["source_frames"], meta["stride"]) == (24, 24, 1)
    assert not restore_md.export_allatom_sample(str(run_dir), ckpt_text, str(state))  # not grown: kept
    import mdtraj as md

    sample = md.load(str(state / "allatom_sample.dcd"), top=str(state / "topology.pdb"))
    local = md.load(str(run_dir / "traj.dcd"), top=str(run_dir / "topology.pdb"))[:24]
    np.testing.assert_allclose(sample.xyz, local.xyz, atol=1e-5)
    fresh = tmp_path / "fresh" / "2M9I" / "r0"
    assert restore_md.ensure_run_dir(str(fresh), _args(exported["pdb"], fresh), "2M9I", 0,
                                     str(base / "data" / "manifest.json"), str(tmp_path / "state"),
                                     log=lambda *a: None) == "exact"
    dcd, top, n, what = restore_md.allatom_md(str(fresh))
    assert dcd.endswith("allatom_sample.dcd") and n == 24 and "committed" in what
    assert restore_md.allatom_md(str(run_dir))[0].endswith("traj.dcd")  # the original has its own frames
