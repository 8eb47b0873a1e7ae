"""training/train.py under DDP: two gloo processes started by torchrun stay replicas of each other.

torchrun runs a small worker that calls ``train.train`` exactly as ``python training/train.py``
would under torchrun (RANK, WORLD_SIZE, ... from the environment), then saves its own weights.
Each rank trains on different windows of the global batch, so equal weights after two steps
mean the gradients really were averaged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from test_train import TINY, tiny_config, write_short_md_manifest
from training_helpers import REPO, load_training_module

train = load_training_module("train")

WORKER = textwrap.dedent("""
    import importlib.util, json, os, sys
    import torch
    spec = importlib.util.spec_from_file_location("starmd_training_train", sys.argv[1])
    train = importlib.util.module_from_spec(spec)
    sys.modules["starmd_training_train"] = train
    spec.loader.exec_module(train)
    cfg = train.TrainConfig(**json.loads(sys.argv[2]))
    trainer = train.train(cfg, log=lambda *a, **k: None)
    torch.save({"net": trainer.net.state_dict(), "ema": trainer.ema.shadow.state_dict(),
                "history": trainer.history, "rows": trainer.batches.rows.tolist()},
               os.path.join(cfg.out, f"rank{trainer.info.rank}.pt"))
""")


def test_two_gloo_processes_keep_replicas_in_sync(tmp_path):
    manifest = write_short_md_manifest(tmp_path / "data")
    out = tmp_path / "run"
    # windows of up to 8 frames, down to 3 at large Δt: the ranks' batches differ in frame count,
    # and each rank's loss is scaled by its share of the global batch's frames
    cfg = tiny_config(manifest, out, steps=2, batch_size=4, ckpt_every=1, window=8, min_window=3, dt_max_ns=1.45e-3)
    sampler = train.WindowSampler(train.load_split_shards(cfg, train.read_manifest(str(manifest)), "train", print)[0],
                                  8, (cfg.dt_min_ns, cfg.dt_max_ns), cfg.max_residues, seed=cfg.seed, min_window=3)
    frames = [[int(f) for f in sampler.sample(4)["frame_mask"].sum(1)] for _ in range(2)]  # the run's two global batches
    assert any(sorted(fs[0::2]) != sorted(fs[1::2]) or max(fs[0::2]) != max(fs[1::2]) for fs in frames), frames
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         str(REPO / "training" / "train.py"), json.dumps(cfg.to_dict())],
        capture_output=True, text=True, env=env, timeout=240)
    # the workers' own tracebacks come first in stderr, torchrun's summary last: show both
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[:4000], proc.stderr[-1500:])
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["rows"] == [0, 2] and r1["rows"] == [1, 3]  # a DistributedSampler-style split of the global batch
    assert r0["history"] == r1["history"] and len(r0["history"]) == 2  # both report the global loss
    for key in ("net", "ema"):
        for name, a in r0[key].items():
            assert torch.equal(a, r1[key][name]), (key, name)
    init = train.StarMDNetwork(cfg.model_config())
    assert not torch.equal(r0["net"]["head.weight"], init.state_dict()["head.weight"])  # it did train
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])
    # every rank restores its own random state, so a single process may not resume it
    try:
        train.Trainer(tiny_config(manifest, out, steps=2, batch_size=4, ckpt_every=1, window=8, min_window=3,
                                  dt_max_ns=1.45e-3, resume="auto"), log=print)
    except train.CheckpointError as err:
        assert "written by 2 processes" in str(err) and "--nproc_per_node=2" in str(err)
    else:  # pragma: no cover
        raise AssertionError("resuming a 2-process checkpoint in 1 process was accepted")
