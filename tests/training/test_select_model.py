"""training/select_model.py: the pre-registered pick, and a comparison on the real validation shard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training_helpers import load_training_module

REPO = Path(__file__).resolve().parents[2]

select_model = load_training_module("select_model")


def test_score_is_mean_validity_and_mean_abs_log_step_ratio():
    rows = [dict(ca_validity=1.0, step_A=2.0, ref_step_A=1.0), dict(ca_validity=0.5, step_A=0.5, ref_step_A=1.0),
            dict(ca_validity=0.0, step_A=1.0, ref_step_A=None)]  # no MD step: not in the step error
    s = select_model.score(rows)
    assert s["validity"] == pytest.approx(0.5)
    assert s["step_error"] == pytest.approx(math.log(2))


def test_pick_prefers_validity_then_step_error():
    a = dict(name="a", validity=0.80, step_error=0.9)
    b = dict(name="b", validity=0.77, step_error=0.2)  # within 0.05 of the best: wins on step error
    c = dict(name="c", validity=0.50, step_error=0.0)  # far less valid: never chosen
    assert select_model.pick([a, b, c])["name"] == "b"
    assert select_model.pick([a, b, c], validity_margin=0.01)["name"] == "a"
    d = dict(name="d", validity=0.80, step_error=float("nan"))  # no step error: loses to a known one
    assert select_model.pick([d, a])["name"] == "a"
    with pytest.raises(ValueError):
        select_model.pick([])


@pytest.fixture()
def two_models(tmp_path):
    import torch

    from openmm_starmd.checkpoints import save_model
    from openmm_starmd.diffusion import DiffusionConfig
    from openmm_starmd.model import ModelConfig, StarMDNetwork
    from openmm_starmd.sampling import SamplingConfig

    paths = []
    for i, anchor in enumerate(("previous", "posterior")):
        torch.manual_seed(i)
        net = StarMDNetwork(ModelConfig(width=32, heads=4, blocks=1, query_points=2, value_points=2, time_fourier=4,
                                        dt_fourier=4, x0_anchor=anchor))
        paths.append(str(save_model(str(tmp_path / f"m{i}.pt"), net, DiffusionConfig(), SamplingConfig(steps=3))))
    return paths


def test_select_on_the_validation_protein(tmp_path, two_models, capsys):
    out = tmp_path / "select.json"
    assert select_model.main(two_models + ["--t-min", "0.01", "0.1", "--dt-ns", "0.01", "--frames", "3",
                                           "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    manifest = json.loads((REPO / "training" / "data" / "manifest.json").read_text())
    validation = sorted({e["protein"] for e in manifest["shards"] if e["split"] == "validation"})
    assert "1GJS" in validation and "2M9I" not in validation  # a test protein never decides
    assert got["split"] == "validation" and got["proteins"] == validation
    assert [(c["model"], c["t_min"]) for c in got["candidates"]] == [(m, t) for m in two_models for t in (0.01, 0.1)]
    for c in got["candidates"]:
        assert 0 <= c["validity"] <= 1 and c["step_error"] >= 0
        assert [r["protein"] for r in c["rows"]] == validation and c["rows"][0]["t_min"] == c["t_min"]
    # the recorded choice is what the rule gives on the recorded scores
    ranked = select_model.pick(got["candidates"])
    assert got["chosen"] == {"model": ranked["model"], "t_min": ranked["t_min"]}
    assert "chosen:" in capsys.readouterr().out


def test_test_split_is_refused(two_models):
    with pytest.raises(SystemExit):
        select_model.main(two_models[:1] + ["--split", "test"])
