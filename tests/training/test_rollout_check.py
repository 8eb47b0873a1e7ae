"""training/rollout_check.py: Cα geometry scoring and a rollout on a committed real MD shard."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training_helpers import TRAINING, load_training_module

rollout_check = load_training_module("rollout_check")


def _real_shard():
    from openmm_starmd.data import load_shard

    manifest = json.loads((TRAINING / "data" / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["protein"] == "2M9I" and e["replica"] == 0)
    return load_shard(str(TRAINING / "data" / entry["file"]), entry["sha256"])


def test_ca_geometry_flags_planted_breaks_and_clashes_only():
    shard = _real_shard()
    ca = shard.coords_nm[:4, :, 1].astype(np.float64)
    ok = rollout_check.ca_geometry(ca, shard.residue_index, shard.chain_index)
    assert ok["valid"].all() and 3.6 < ok["ca_ca_A"][1] < 4.0
    bad = ca.copy()
    bad[1, 10:] += np.array([0.3, 0.0, 0.0])  # a 3 Å gap between residues 9 and 10: a break
    bad[2, 5] = bad[2, 20] + 0.01  # two Cα 0.1 Å apart: a clash
    got = rollout_check.ca_geometry(bad, shard.residue_index, shard.chain_index)
    assert got["valid"].tolist() == [True, False, False, True]


def test_ca_geometry_is_the_evaluation_suites_definition():
    """Bonded neighbours closer than 3 Å are no clash (analysis.validity), and gaps of the reference are exempt."""
    shard = _real_shard()
    ca = shard.coords_nm[:2, :, 1].astype(np.float64)
    short = ca.copy()
    bond = short[0, -1] - short[0, -2]
    short[0, -1] = short[0, -2] + bond / np.linalg.norm(bond) * 0.29  # last Cα 2.9 Å from its neighbour
    assert rollout_check.ca_geometry(short, shard.residue_index, shard.chain_index)["valid"].tolist() == [True, True]
    gap = ca.copy()
    gap[:, 10:] += np.array([0.3, 0.0, 0.0])  # a gap present in every frame, the reference included
    assert not rollout_check.ca_geometry(gap, shard.residue_index, shard.chain_index)["valid"].any()
    got = rollout_check.ca_geometry(gap, shard.residue_index, shard.chain_index, reference_nm=gap[0])
    assert got["valid"].all() and got["ca_ca_A"][2] < 4.19


def test_rollout_of_a_fresh_model_on_a_real_shard(tmp_path):
    """A fresh (zero-head) network predicts 'no motion' from the previous frame: Cα stays MD-like."""
    import torch

    from openmm_starmd.checkpoints import save_model
    from openmm_starmd.diffusion import DiffusionConfig
    from openmm_starmd.model import ModelConfig, StarMDNetwork
    from openmm_starmd.sampling import SamplingConfig

    torch.manual_seed(0)
    net = StarMDNetwork(ModelConfig(width=32, heads=4, blocks=1, query_points=2, value_points=2, time_fourier=4,
                                    dt_fourier=4))
    path = tmp_path / "tiny.pt"
    save_model(str(path), net, DiffusionConfig(), SamplingConfig(steps=3))
    rows = tmp_path / "rows.json"
    assert rollout_check.main([str(path), "--proteins", "2M9I", "--dt-ns", "0.01", "--frames", "3",
                               "--json", str(rows)]) == 0
    row = json.loads(rows.read_text())[0]
    assert row["protein"] == "2M9I" and row["frames"] == 3 and row["dt_ns"] == 0.01
    assert row["ca_validity"] == 1.0 and row["ref_ca_validity"] == 1.0
    assert 3.6 < row["ca_ca_A"][1] < 4.0 and row["drift_A"] < 1.0
    # per-frame motion next to MD's at the same Δt (MD moves ~0.3-1 Å in 10 ps)
    assert 0 <= row["step_A"] < 1.0 and 0.1 < row["ref_step_A"] < 1.5
    assert row["t_min"] == 0.01  # the model's own when --t-min is not given

    # a sweep of the last diffusion time: one row per value, each recorded (the zero-head network's
    # x0 is the previous frame at any t, so the first row repeats the run above)
    assert rollout_check.main([str(path), "--proteins", "2M9I", "--dt-ns", "0.01", "--frames", "3",
                               "--t-min", "0.01", "0.2", "--json", str(rows)]) == 0
    sweep = json.loads(rows.read_text())
    assert [r["t_min"] for r in sweep] == [0.01, 0.2]
    assert sweep[0]["step_A"] == pytest.approx(row["step_A"], rel=1e-6)


def test_mean_step_is_the_superposed_rmsd_between_frames_stride_apart():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 12, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    still = np.stack([x[0] @ q.T + k for k in range(4)])  # one structure, moved rigidly
    assert rollout_check.mean_step_A(still) == pytest.approx(0.0, abs=1e-6)
    two = np.stack([x[0], x[0] + np.array([[0.1, 0, 0]] * 6 + [[-0.1, 0, 0]] * 6)])  # ±1 Å, zero mean
    # 1 Å per atom before superposition; the fit can only lower it, and here only a little
    assert 0.95 < rollout_check.mean_step_A(two) <= 1.0 + 1e-9
    four = np.stack([x[0], x[1], x[0], x[1]])
    assert rollout_check.mean_step_A(four, stride=2) == pytest.approx(0.0, abs=1e-6)
    assert rollout_check.mean_step_A(four) > 1.0
    # a restart at frame 3 (frames 0-2 one structure, 3-5 another): below 1 ns the MD step
    # leaves out the pairs across it, as the training windows do
    jump = np.stack([x[0]] * 3 + [x[1]] * 3)
    assert rollout_check.mean_step_A(jump) > 0.1
    assert rollout_check.mean_step_A(jump, restarts=[3]) == pytest.approx(0.0, abs=1e-6)
    assert rollout_check.mean_step_A(jump, stride=2, restarts=[3]) == pytest.approx(0.0, abs=1e-6)


def test_a_missing_model_file_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        rollout_check.main([str(tmp_path / "nope.pt")])
    assert exc.value.code == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
