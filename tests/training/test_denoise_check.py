"""training/denoise_check.py: one-shot x0 errors next to the network-free estimators, on real shards."""
from __future__ import annotations

import json

import pytest
import torch

from training_helpers import TRAINING, load_training_module

denoise_check = load_training_module("denoise_check")


def _fresh_model(tmp_path, anchor: str, anchor_frames: int = 1):
    from openmm_starmd.checkpoints import save_model
    from openmm_starmd.diffusion import DiffusionConfig
    from openmm_starmd.model import ModelConfig, StarMDNetwork

    torch.manual_seed(0)
    net = StarMDNetwork(ModelConfig(width=32, heads=4, blocks=1, query_points=2, value_points=2, time_fourier=4,
                                    dt_fourier=4, x0_anchor=anchor, anchor_frames=anchor_frames))
    path = tmp_path / f"fresh_{anchor}_{anchor_frames}.pt"
    save_model(str(path), net, DiffusionConfig())
    return path


@pytest.mark.parametrize("anchor, frames, same_as", [("previous", 1, "previous"), ("previous", 3, "anchor"),
                                                     ("noisy", 1, "noisy"), ("posterior", 1, "posterior"),
                                                     ("posterior", 3, "posterior")])
def test_a_fresh_network_scores_exactly_as_its_base(tmp_path, anchor, frames, same_as):
    """A zero-head network returns its base, so its column equals that estimator's, and differs from the others."""
    out = tmp_path / "rows.json"
    model = _fresh_model(tmp_path, anchor, frames)
    assert denoise_check.main([str(model), "--manifest", str(TRAINING / "data" / "manifest.json"),
                               "--split", "test", "--t", "0.001", "0.1", "--windows", "3", "--window", "4",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["t"] for r in rows] == [0.001, 0.1]
    for r in rows:
        assert r["model"] == pytest.approx(r[same_as], rel=1e-4, abs=1e-6)
        assert (r["anchor"] == r["previous"]) == (frames == 1)
        # real MD windows: no motion keeps MD's Cα-Cα (error ~0.06 Å), x_t at t = 0.1 is 3 Å off
        assert r["anchor"]["ca_ca_err_A"] < 0.2
    assert rows[1]["noisy"]["ca_rmse_A"] > 3 * rows[1]["anchor"]["ca_rmse_A"]
    # the posterior mean is about as good as the better of its ingredients at t = 0.1 and much better
    # than no motion at t = 0.001. At t = 0.1 it is (1 - c) anchor + c x_t with c ~ 0.09 (prior s = 1 Å,
    # noise 3.2 Å), so its error is the anchor's plus a tenth of the noise: within 20 % of the anchor's
    # on these real, still-growing shards (0.885 vs 0.823 Å with the 3-frame history mean on the
    # shards of 2026-11-26 11:30; an absolute 0.05-Å margin failed there), far below x_t's 3 Å.
    assert rows[1]["posterior"]["ca_rmse_A"] < 1.2 * min(rows[1]["anchor"]["ca_rmse_A"], rows[1]["noisy"]["ca_rmse_A"])
    assert rows[0]["posterior"]["ca_rmse_A"] < 0.5 * rows[0]["anchor"]["ca_rmse_A"]


def test_posterior_mean_ca_limits():
    a = torch.zeros(1, 2, 3, dtype=torch.float64)
    x = torch.ones(1, 2, 3, dtype=torch.float64)
    o = torch.zeros(1, 3, dtype=torch.float64)
    assert torch.allclose(denoise_check.posterior_mean_ca(x, a, o, 1.0, 1e-6, 0.1), x, atol=1e-8)
    assert torch.allclose(denoise_check.posterior_mean_ca(x, a, o, 0.5, 10.0, 0.1), a, atol=1e-3)


def test_a_missing_model_file_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        denoise_check.main([str(tmp_path / "nope.pt")])
    assert exc.value.code == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
