"""training/release.py: the release procedure as one resumable command, run for real on a tiny
recipe (2 training steps, 3-frame rollouts) over the committed shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training_helpers import REPO, TRAINING, load_training_module

release = load_training_module("release")
MANIFEST = TRAINING / "data" / "manifest.json"
TINY_RECIPE = """\
model: {width: 16, heads: 4, blocks: 1, query_points: 2, value_points: 2, time_fourier: 4, dt_fourier: 4}
window: 4
min_window: 4
batch_size: 2
steps: 2
warmup_steps: 1
val_every: 0
val_windows: 2
ckpt_every: 100
threads: 1
"""


def _release(*args, check=True):
    proc = subprocess.run([sys.executable, str(TRAINING / "release.py"), *map(str, args)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"release.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _sha(path):
    return release.sha256_file(str(path))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Train both variants (2 steps), select on the validation protein and export, as a rehearsal."""
    root = tmp_path_factory.mktemp("release")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = root / "rel"
    args = ["--rehearsal", "--config", recipe, "--frames", "3", "--out", out, "--until", "export", "--poll", "0.5"]
    bundled_before = _sha(release.BUNDLED)
    first = _release(*args)
    return dict(out=out, args=args, first=first, recipe=recipe, bundled_before=bundled_before)


def test_rehearsal_trains_both_variants_picks_by_the_rule_and_exports(rehearsal):
    from openmm_starmd.checkpoints import load_model

    out = rehearsal["out"]
    state = json.loads((out / "release.json").read_text())
    assert [n for n in state["steps"]] == ["train_a", "train_b", "select", "export"]  # no floor step in a rehearsal
    assert all(rec["rc"] == 0 for rec in state["steps"].values())
    assert state["manifest_sha256"] == _sha(MANIFEST)
    assert "anchor_prior_dt_exponent=0.25" in state["steps"]["train_b"]["command"]
    assert "anchor_prior_dt_exponent" not in state["steps"]["train_a"]["command"]
    select = json.loads((out / "select.json").read_text())
    assert {c["t_min"] for c in select["candidates"]} == {0.01, 0.03, 0.05}
    assert select["dt_ns"] == [0.01, 0.1, 1.0] and select["split"] == "validation"
    chosen_run, t_min = release._chosen(str(out))
    assert chosen_run in (str(out / "a"), str(out / "b"))
    model = load_model(str(out / "default.pt"))  # the pick, with its t_min as the sampling default
    assert model.sampling_config.t_min == pytest.approx(t_min)
    assert model.model_config.width == 16 and model.metadata["steps"] == 2
    assert model.metadata["exported_from"] == os.path.join(chosen_run, "checkpoint.pt")
    for variant in "ab":
        assert (out / variant / "loss.png").stat().st_size > 0
    # a rehearsal leaves the bundled model alone and keeps a copy of it as "previous"
    assert _sha(release.BUNDLED) == rehearsal["bundled_before"] == _sha(out / "previous_default.pt")
    assert "export: done" in rehearsal["first"].stdout


def test_rerun_skips_what_is_done_and_redoes_what_is_missing(rehearsal):
    out = rehearsal["out"]
    before = json.loads((out / "release.json").read_text())
    again = _release(*rehearsal["args"])
    assert again.stdout.count("done earlier, skipped") == 4
    assert json.loads((out / "release.json").read_text()) == before  # nothing ran
    (out / "default.pt").unlink()  # an output gone: its step alone runs again
    third = _release(*rehearsal["args"])
    assert third.stdout.count("done earlier, skipped") == 3 and "export: done" in third.stdout
    assert (out / "default.pt").exists()


def test_a_cut_off_training_run_resumes_from_its_checkpoint(rehearsal, tmp_path):
    """A record without an exit status (the driver was killed) makes the next run resume it."""
    out = rehearsal["out"]
    state = json.loads((out / "release.json").read_text())
    state["steps"]["train_a"].update(rc=None)
    (out / "release.json").write_text(json.dumps(state))
    args = [a if a != "export" else "train_a" for a in rehearsal["args"]] + ["--steps", "3"]
    _release(*args)
    log = (out / "logs" / "train_a.log").read_text()
    assert "--resume auto" in json.loads((out / "release.json").read_text())["steps"]["train_a"]["command"]
    assert "resumed" in log
    from openmm_starmd.checkpoints import load_model
    assert load_model(str(out / "a" / "model.pt")).metadata["steps"] == 3


def test_a_release_is_not_continued_on_other_data(tmp_path):
    state = {"steps": {}}
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    release.check_manifest(state, str(manifest), str(tmp_path))
    manifest.write_text('{"grew": true}')
    with pytest.raises(release.ReleaseError, match="another version"):
        release.check_manifest(state, str(manifest), str(tmp_path))


def test_below_the_floor_nothing_is_trained(tmp_path):
    """The real release (not a rehearsal) stops at the floor check; here the floor cannot be met
    because the manifest has no test proteins."""
    shards = json.loads(MANIFEST.read_text())
    shards["shards"] = [e for e in shards["shards"] if e["split"] != "test"]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(shards))
    proc = _release("--manifest", manifest, "--out", tmp_path / "rel", "--poll", "0.2", check=False)
    assert proc.returncode == 1
    assert "floor: FAILED" in proc.stdout and "train_a: not run, it needs floor" in proc.stdout
    assert "training/prepare.py" in proc.stdout  # the hint: shards may be older than the MD
    assert not (tmp_path / "rel" / "a").exists()
    log = (tmp_path / "rel" / "logs" / "floor.log").read_text()
    assert "not met" in log


def test_options_that_change_the_procedure_need_rehearsal(capsys):
    with pytest.raises(SystemExit):
        release.main(["--steps", "2", "--dry-run"])
    assert "--rehearsal" in capsys.readouterr().err


def test_a_saved_release_continues_on_a_fresh_clone(rehearsal, tmp_path):
    """--save packs OUT; a run whose OUT is empty (a fresh clone) unpacks it and skips what is done."""
    state_dir = tmp_path / "state"
    _release("--save", "--out", rehearsal["out"], "--state-dir", state_dir)
    saved = state_dir / "rel.tar.gz"
    assert saved.exists() and saved.stat().st_size > 10_000
    fresh = tmp_path / "clone" / "rel"  # same name, another machine's path
    args = [a if a != rehearsal["out"] else fresh for a in rehearsal["args"]] + ["--state-dir", state_dir]
    again = _release(*args)
    assert "restored the saved release" in again.stdout
    assert again.stdout.count("done earlier, skipped") == 4
    assert (fresh / "a" / "checkpoint.pt").exists() and (fresh / "default.pt").exists()


def test_an_exported_bundled_model_that_did_not_land_is_exported_again(tmp_path):
    """The export step's output outside OUT (the bundled model) counts only with its recorded sha256."""
    target = tmp_path / "bundled.pt"
    target.write_bytes(b"exported by the release")
    step = release.Step("export", ["x"], [str(target)])
    state = {"steps": {"export": {"rc": 0, "output_sha256": release._output_digests(step, str(tmp_path / "out"))}}}
    assert release.is_done(step, state)
    target.write_bytes(b"the committed model of a fresh clone")
    assert not release.is_done(step, state)
    inside = tmp_path / "out" / "select.json"  # outputs inside OUT are not pinned
    inside.parent.mkdir()
    inside.write_text("{}")
    assert release._output_digests(release.Step("select", ["x"], [str(inside)]), str(tmp_path / "out")) == {}


def test_a_release_with_a_state_dir_saves_itself_after_each_step(rehearsal, tmp_path):
    import tarfile

    state_dir = tmp_path / "state"
    args = [a if a != "export" else "train_a" for a in rehearsal["args"]]
    args = [a if a != rehearsal["out"] else tmp_path / "rel2" for a in args] + ["--state-dir", state_dir]
    proc = _release(*args)
    assert "saving the release (train_a done)" in proc.stdout
    with tarfile.open(state_dir / "rel2.tar.gz") as tar:
        record = json.load(tar.extractfile("release.json"))
        assert "a/checkpoint.pt" in tar.getnames()
    assert record["steps"]["train_a"]["rc"] == 0
