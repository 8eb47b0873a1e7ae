"""training/train.py: windows -> block-causal steps -> checkpoints -> exact resume -> export.

Real data: the shipped 1ENH trajectory (tests/data/short_md_1enh.npz, 100 frames every 0.05 ps)
written as two real shards with a manifest (frames 0-59 train, 60-99 validation). A tiny network
keeps every run to a few steps of well under a second.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_starmd.data import BackboneShard, TrajectoryError, save_shard
from openmm_starmd.geometry.rigid import Rigid
from training_helpers import REPO, load_training_module

train = load_training_module("train")
SHORT_MD = Path(__file__).parents[1] / "data" / "short_md_1enh.npz"
TINY = dict(width=16, heads=4, blocks=1, query_points=2, value_points=2, time_fourier=4, dt_fourier=4)
torch.set_num_threads(1)


def write_short_md_manifest(root: Path) -> Path:
    """Shards of the shipped 1ENH MD (train: frames 0-59, validation: 60-99) and their manifest."""
    d = np.load(SHORT_MD)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, split, frames in (("1enh_a", "train", slice(0, 60)), ("1enh_b", "validation", slice(60, 100))):
        bb = d["backbone_nm"][frames]
        shard = BackboneShard(bb, float(d["frame_spacing_ns"]), str(d["sequence"]), d["residue_index"],
                              d["chain_index"], ["A"], np.ones(bb.shape[1], bool), name=name)
        sha = save_shard(root / "shards" / f"{name}_r0.npz", shard)
        entries.append(dict(protein=name, replica=0, split=split, file=f"shards/{name}_r0.npz", sha256=sha,
                            frames=shard.n_frames, residues=shard.n_residues, spacing_ns=shard.frame_spacing_ns))
    path = root / "manifest.json"
    path.write_text(json.dumps({"format_version": 1, "shards": entries}))
    return path


def tiny_config(manifest: Path, out: Path, **kw) -> "train.TrainConfig":
    """A few-step run on the short MD: windows of 3 frames at Δt 0.05-0.5 ps, 2 windows per step."""
    opts = dict(manifest=str(manifest), out=str(out), window=3, batch_size=2, steps=4, warmup_steps=1,
                dt_min_ns=5e-5, dt_max_ns=5e-4, model=dict(TINY), val_every=0, val_windows=2, ckpt_every=100,
                log_every=1, progress=False, threads=1, max_residues=40)
    opts.update(kw)
    return train.TrainConfig(**opts)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_short_md_manifest(tmp_path_factory.mktemp("short_md_shards"))


def _quiet(*args, **kwargs):
    pass


# ------------------------------------------------------------------------------------------ resume
def test_one_step_checkpoint_resume_gives_bit_equal_losses(manifest, tmp_path):
    whole = train.train(tiny_config(manifest, tmp_path / "whole"), log=_quiet)
    first = train.train(tiny_config(manifest, tmp_path / "split", stop_after=1), log=_quiet)
    assert [s for s, _ in first.history] == [1]
    assert first.history[0] == whole.history[0]
    rest = train.train(tiny_config(manifest, tmp_path / "split", resume="auto"), log=_quiet)
    assert rest.history == whole.history[1:]  # exact float equality, step by step
    for a, b in zip(whole.net.state_dict().values(), rest.net.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.shadow.state_dict().values(), rest.ema.shadow.state_dict().values()):
        assert torch.equal(a, b)
    assert rest.batches.windows_drawn == whole.batches.windows_drawn == 8
    # the log holds every step once, the resumed ones after the first
    steps = [int(line.split(",")[0]) for line in (tmp_path / "split" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0


def test_checkpoint_is_plain_data_with_every_state(manifest, tmp_path):
    train.train(tiny_config(manifest, tmp_path / "run", steps=2), log=_quiet)
    path = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "openmm-starmd-training" and payload["step"] == 2 and payload["world_size"] == 1
    cfg = json.loads(payload["config"])  # plain JSON
    assert cfg["window"] == 3 and cfg["model"]["width"] == 16
    for key in ("model", "ema", "optimizer", "scheduler", "data"):
        assert key in payload
    assert payload["scheduler"]["last_epoch"] == 2
    assert set(payload["rng"][0]) >= {"generator", "torch", "numpy", "python"}
    assert json.loads(payload["data"]["sampler_rng"])["bit_generator"] == "PCG64"
    assert not list((tmp_path / "run").glob("*.tmp"))


# ------------------------------------------------------------------------------------------ inputs
def _windows(manifest, L: int, n: int):
    """n windows of L frames of the tiny manifest, their model inputs, and a default SE3Diffuser."""
    from openmm_starmd.diffusion import SE3Diffuser

    cfg = tiny_config(manifest, Path("unused"))
    shards, _ = train.load_split_shards(cfg, train.read_manifest(str(manifest)), "train", _quiet)
    batch = train.WindowSampler(shards, L, (5e-5, 5e-4), seed=4).sample(n)
    return (batch, *train.window_inputs(batch, "cpu", torch.float64), SE3Diffuser())


def test_contextual_noise_reaches_the_clean_history_and_never_the_noisy_frames(manifest):
    batch, clean, residues, dt, diffuser = _windows(manifest, 3, 2)

    def build(on):
        g = torch.Generator().manual_seed(11)
        return train.noised_sequence(diffuser, clean, residues, dt, g, contextual_noise=on)

    (seq_on, tg_on), (seq_off, tg_off) = build(True), build(False)
    L = 3
    # noisy slots: bit-identical whether or not the history is perturbed
    assert torch.equal(seq_on.frames.trans[:, L:], seq_off.frames.trans[:, L:])
    assert torch.equal(seq_on.frames.rots[:, L:], seq_off.frames.rots[:, L:])
    assert torch.equal(seq_on.noise_level[:, L:], seq_off.noise_level[:, L:])
    # clean slots: the data itself when off, perturbed by tau ~ U[0, 0.1] when on
    assert torch.equal(seq_off.frames.trans[:, :L], clean.trans) and torch.equal(seq_off.frames.rots[:, :L], clean.rots)
    assert torch.equal(seq_off.noise_level[:, :L], torch.zeros(2, L, dtype=torch.float64))
    tau = seq_on.noise_level[:, :L]
    assert (tau > 0).all() and (tau <= 0.1).all()
    shift = (seq_on.frames.trans[:, :L] - clean.trans).norm(dim=-1).mean(-1)  # (B, L) nm
    assert (shift > 0).all()
    # the x0 anchors of the clean slots are the data before contextual noise, on or off
    assert torch.equal(seq_on.anchor_frames.trans[:, :L], clean.trans)
    assert torch.equal(seq_on.anchor_frames.rots[:, :L], clean.rots)
    assert torch.equal(tg_on.noisy_shifted.trans, tg_off.noisy_shifted.trans) and torch.equal(tg_on.x0.trans, tg_off.x0.trans)
    order = torch.argsort(tau.flatten())
    assert shift.flatten()[order[-1]] > shift.flatten()[order[0]]  # more tau, more displacement
    # targets are the clean data in both cases, and the window's Δt conditions every token
    assert torch.equal(tg_on.x0.trans, clean.trans)
    assert torch.equal(seq_on.dt_ns, torch.as_tensor(batch["dt_ns"], dtype=torch.float64))
    assert torch.equal(seq_on.noisy, torch.arange(2 * L) >= L)
    assert torch.equal(seq_on.frame_index, torch.arange(L).repeat(2))


def test_loguniform_t_sampling_puts_more_frames_near_t_min(manifest):
    _, clean, residues, dt, diffuser = _windows(manifest, 2, 1)
    t_min = diffuser.config.t_min
    draws = {}
    for mode in ("uniform", "loguniform"):
        g = torch.Generator().manual_seed(3)
        ts = [train.noised_sequence(diffuser, clean, residues, dt, g, True, mode)[0].noise_level[:, 2:]
              for _ in range(400)]
        draws[mode] = torch.cat(ts).flatten()
        assert (draws[mode] >= t_min - 1e-12).all() and (draws[mode] <= 1).all()
    low = {m: float((d < 2 * t_min).double().mean()) for m, d in draws.items()}
    # P(t < 2 t_min): 1 % uniform, log 2 / log 100 = 15 % log-uniform
    assert low["uniform"] < 0.04 and 0.10 < low["loguniform"] < 0.21
    with pytest.raises(ValueError, match="t_sampling"):
        train.noised_sequence(diffuser, clean, residues, dt, torch.Generator(), True, "beta")


# ------------------------------------------------------------------------------------------ bad input
def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(TrajectoryError, match="does not exist; run training/prepare.py"):
        train.Trainer(tiny_config(tmp_path / "nope.json", tmp_path / "a"), log=_quiet)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(TrajectoryError, match="lists no shards"):
        train.Trainer(tiny_config(empty, tmp_path / "b"), log=_quiet)


def test_shard_with_wrong_sha256(manifest, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(manifest.parent, root)
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrajectoryError, match="sha256 .* differs from the manifest"):
        train.Trainer(tiny_config(root / "manifest.json", tmp_path / "run"), log=_quiet)


def test_window_longer_than_every_trajectory(manifest, tmp_path):
    with pytest.raises(TrajectoryError, match="fit no trajectory of split 'train'.*longest has 60 frames.*--window 60"):
        train.Trainer(tiny_config(manifest, tmp_path / "run", window=61, min_window=61), log=_quiet)
    with pytest.raises(TrajectoryError, match="windows of 61 frames .*use --min-window 60"):
        train.Trainer(tiny_config(manifest, tmp_path / "run", window=70, min_window=61), log=_quiet)
    # too long for the validation trajectories only: training goes on without validation, and says so
    notes = []
    trainer = train.Trainer(tiny_config(manifest, tmp_path / "run", window=45, min_window=45), log=notes.append)
    assert trainer.val_batches == [] and any("validation loss is not computed" in n for n in notes)


def test_short_trajectories_train_large_dt_with_shorter_padded_windows(manifest, tmp_path):
    """60 frames at 0.05 ps, L = 8: full windows reach Δt 0.4 ps, min_window 3 reaches 1.45 ps; such
    examples have fewer frames, padding outside the loss, and a batch is trimmed to its longest example."""
    cfg = tiny_config(manifest, tmp_path / "run", window=8, min_window=3, dt_max_ns=1.45e-3, steps=2, batch_size=4)
    trainer = train.Trainer(cfg, log=_quiet)
    assert trainer.trained_dt_ns[1] == pytest.approx(29 * 5e-5)
    seen_short = False
    for _ in range(6):
        batch = trainer.batches.next()
        f = batch["frame_mask"].sum(1)
        assert batch["coords_nm"].shape[1] == batch["frame_mask"].shape[1] == f.max() <= 8 and f.min() >= 3
        k = np.rint(batch["dt_ns"] / 5e-5).astype(int)
        np.testing.assert_array_equal(f, np.minimum(8, 59 // k + 1))
        seen_short |= bool(f.min() < 8)
    assert seen_short
    done = train.train(tiny_config(manifest, tmp_path / "run2", window=8, min_window=3, dt_max_ns=1.45e-3, steps=2,
                                   batch_size=4), log=_quiet)
    assert len(done.history) == 2 and all(np.isfinite(v) for _, v in done.history)


def test_incompatible_or_foreign_checkpoint(manifest, tmp_path):
    cfg = tiny_config(manifest, tmp_path / "run", steps=1, export=str(tmp_path / "model.pt"))
    train.train(cfg, log=_quiet)
    with pytest.raises(train.CheckpointError, match="already exists; pass --resume auto"):
        train.Trainer(cfg, log=_quiet)
    wider = tiny_config(manifest, tmp_path / "run", resume="auto", model=dict(TINY, width=32))
    with pytest.raises(train.CheckpointError, match="incompatible config .*model"):
        train.Trainer(wider, log=_quiet)
    with pytest.raises(train.CheckpointError, match="not a training checkpoint"):
        train.Trainer(tiny_config(manifest, tmp_path / "other", resume=str(tmp_path / "model.pt")), log=_quiet)
    with pytest.raises(train.CheckpointError, match="does not exist"):
        train.Trainer(tiny_config(manifest, tmp_path / "none", resume="auto"), log=_quiet)


def test_nan_loss_stops_names_the_batch_and_keeps_the_last_checkpoint(manifest, tmp_path):
    # a learning rate of 1e30 makes the first update blow the weights up; step 2's loss is not finite
    cfg = tiny_config(manifest, tmp_path / "run", lr=1e30, warmup_steps=0, ckpt_every=1, steps=5)
    with pytest.raises(train.NonFiniteLossError) as err:
        train.train(cfg, log=_quiet)
    msg = str(err.value)
    assert "at step 2 (batch 2" in msg and "1enh_a r0 from" in msg and "Δt" in msg
    assert "last good checkpoint is" in msg and "(step 1)" in msg
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 1
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_bad_options_are_named(manifest, tmp_path):
    with pytest.raises(train.ConfigError, match="window=1"):
        tiny_config(manifest, tmp_path, window=1)
    with pytest.raises(train.ConfigError, match=r"model overrides \['window'\] are training options"):
        tiny_config(manifest, tmp_path, model=dict(TINY, window=4))
    with pytest.raises(train.ConfigError, match="unknown option"):
        train.TrainConfig.from_dict({"lrr": 1.0})


# ------------------------------------------------------------------------------------------ CLI, YAML
def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for f in train.TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text, f
    assert "--no-contextual-noise" in text and "--config" in text and "--plot" in text


def test_yaml_configs_parse_and_flags_override(tmp_path):
    config = load_training_module("config")
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        cfg, _, _ = config.parse_args(["--config", str(path)])
        cfg.model_config()  # a valid network
        cfg.diffusion_config()
    cfg, _, given = config.parse_args(["--config", str(REPO / "training/configs/smoke.yaml"), "--window", "5",
                                       "--model", "width=64", "--no-contextual-noise", "--attention", "separable"])
    assert cfg.window == 5 and cfg.model["width"] == 64 and cfg.model["heads"] == 4
    assert not cfg.contextual_noise and cfg.attention == "separable" and {"window", "model"} <= given
    mc = cfg.model_config()
    assert mc.window == 5 and mc.attention == "separable" and not mc.contextual_noise
    # the default YAML restates the dataclass defaults
    default, _, _ = config.parse_args(["--config", str(REPO / "training/configs/default.yaml")])
    a, b = default.to_dict(), train.TrainConfig().to_dict()
    assert {k for k in a if a[k] != b[k]} == {"out", "export", "loss"}
    assert train.LossConfig(**default.loss) == train.LossConfig()


def test_cli_resume_takes_the_checkpoint_config(manifest, tmp_path):
    out = tmp_path / "cli"
    args = ["--manifest", str(manifest), "--out", str(out), "--window", "3", "--batch-size", "2", "--steps", "3",
            "--dt-min-ns", "5e-5", "--dt-max-ns", "5e-4", "--max-residues", "40", "--val-every", "0", "--no-progress",
            "--stop-after", "1"] + ["--model"] + [f"{k}={v}" for k, v in TINY.items()]
    assert train.main(args) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert train.main(["--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3  # --stop-after is not inherited
    assert train.main(["--plot", "--out", str(out)]) == 0
    assert train.main(["--resume", "auto", "--out", str(out), "--window", "4"]) == 1  # incompatible: a clean error


def test_a_stop_request_ends_the_run_with_a_checkpoint(manifest, tmp_path):
    trainer = train.Trainer(tiny_config(manifest, tmp_path / "run", steps=10), log=_quiet)
    trainer.request_stop()  # what SIGTERM/SIGUSR1 do from the command line
    trainer.fit()
    assert trainer.step == 1
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1


# ------------------------------------------------------------------------------------------ export
def test_exported_ema_model_loads_and_samples_a_frame(manifest, tmp_path):
    from openmm_starmd.checkpoints import load_model
    from openmm_starmd.sampling import AutoregressiveSampler, SamplingConfig

    path = tmp_path / "models" / "tiny.pt"
    trainer = train.train(tiny_config(manifest, tmp_path / "run", steps=2, val_every=1, export=str(path)), log=_quiet)
    assert len(trainer.val_history) == 2
    loaded = load_model(path)
    for a, b in zip(loaded.model.state_dict().values(), trainer.ema.shadow.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.model_config.window == 3 and loaded.metadata["weights"] == "ema" and loaded.metadata["steps"] == 2
    d = np.load(SHORT_MD)
    aatype = train.window_inputs(train.WindowSampler(
        train.load_split_shards(trainer.cfg, train.read_manifest(str(manifest)), "train", _quiet)[0], 3,
        (5e-5, 5e-4), seed=0).sample(1), "cpu")[1].aatype[0]
    sampler = AutoregressiveSampler(loaded.model, loaded.diffuser, aatype, d["residue_index"], d["chain_index"], None,
                                    dt_ns=1e-4, config=SamplingConfig(steps=3), seed=0)
    from openmm_starmd.geometry.frames import frames_from_backbone

    bb = torch.as_tensor(d["backbone_nm"][0])
    sampler.add_history(frames_from_backbone(bb[:, 0], bb[:, 1], bb[:, 2]))
    frames = sampler.generate(1)
    assert frames.trans.shape[-2:] == (48, 3) and torch.isfinite(frames.trans).all()


def test_a_stopped_run_does_not_export_until_it_finishes(manifest, tmp_path):
    path = tmp_path / "model.pt"
    train.train(tiny_config(manifest, tmp_path / "run", steps=2, stop_after=1, export=str(path)), log=_quiet)
    assert not path.exists()  # half-trained: nothing where the finished model goes
    train.train(tiny_config(manifest, tmp_path / "run", steps=2, resume="auto", export=str(path)), log=_quiet)
    assert path.exists()


def test_export_script_writes_the_checkpoints_ema_weights(manifest, tmp_path):
    """training/export.py turns a stopped run's checkpoint into the same model file --export would write."""
    from openmm_starmd.checkpoints import load_model

    export = load_training_module("export")
    direct = tmp_path / "direct.pt"
    trainer = train.train(tiny_config(manifest, tmp_path / "run", steps=2, export=str(direct)), log=_quiet)
    later = export.export(trainer.out / "checkpoint.pt", tmp_path / "later.pt", note="test")
    a, b = load_model(direct), load_model(later)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert b.metadata["steps"] == 2 and b.metadata["note"] == "test"
    # both record what the model was trained on: every training trajectory, with its sha256
    entries = [e for e in json.loads(Path(manifest).read_text())["shards"] if e["split"] == "train"]
    for m in (a, b):
        got = m.metadata["train_data"]
        assert [(d["protein"], d["replica"], d["frames"], d["sha256"]) for d in got] == sorted(
            (e["protein"], e["replica"], e["frames"], e["sha256"]) for e in entries)
    assert a.sampling_config.to_dict() == b.sampling_config.to_dict()
    # recommended sampler settings can be stored with the model; a wrong field is a usage error
    tuned = load_model(export.export(trainer.out / "checkpoint.pt", tmp_path / "tuned.pt", sampling={"t_min": 0.05}))
    assert tuned.sampling_config.t_min == 0.05 and a.sampling_config.t_min == 0.01
    assert tuned.sampling_config.context_tau_max == a.sampling_config.context_tau_max
    with pytest.raises(SystemExit):
        export.main([str(trainer.out / "checkpoint.pt"), str(tmp_path / "bad.pt"), "--sampling", "tmin=0.05"])
    assert not (tmp_path / "bad.pt").exists()
    # a checkpoint from before the per-trajectory record: rebuilt from its data fingerprint and the manifest
    payload = torch.load(trainer.out / "checkpoint.pt", weights_only=True)
    coverage = json.loads(payload["coverage"])
    del coverage["train_data"]
    payload["coverage"] = json.dumps(coverage)
    torch.save(payload, tmp_path / "old.pt")
    old = load_model(export.export(tmp_path / "old.pt", tmp_path / "old_model.pt"))
    assert old.metadata["train_data"] == a.metadata["train_data"]
