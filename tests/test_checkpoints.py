"""Checkpoints: exact round trip, atomic writes, and refusal of files that would run code."""
import pickle

import pytest
import torch

from model.helpers import TINY, random_network
from openmm_starmd.checkpoints import BUNDLED_MODELS, load_model, save_model
from openmm_starmd.diffusion import DiffusionConfig
from openmm_starmd.model import ModelConfig
from openmm_starmd.sampling import SamplingConfig


def test_round_trip_restores_weights_and_configs(tmp_path):
    net = random_network(ModelConfig(**TINY, attention="separable", fixed_dt_ns=0.5), dtype=torch.float32)
    dcfg = DiffusionConfig(rot_sigma_max=1.4)
    scfg = SamplingConfig(steps=33, cache_mode="full")
    path = save_model(tmp_path / "m.pt", net, dcfg, scfg, metadata={"trained_on": ["1ENH"], "steps": 10})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left behind
    loaded = load_model(path)
    assert loaded.model_config == net.config and loaded.diffusion_config == dcfg
    assert loaded.sampling_config == scfg and loaded.metadata == {"trained_on": ["1ENH"], "steps": 10}
    assert loaded.diffuser.config == dcfg
    assert not loaded.model.training
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_float64_model_stays_float64(tmp_path):
    net = random_network(ModelConfig(**TINY), dtype=torch.float64)
    loaded = load_model(save_model(tmp_path / "m.pt", net, DiffusionConfig()))
    assert loaded.model.dtype == torch.float64 and loaded.sampling_config == SamplingConfig()


class _Trap:
    def __reduce__(self):
        import os

        return (os.system, ("touch booby_trap_ran",))


def test_booby_trapped_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "openmm-starmd-checkpoint", "state_dict": _Trap()}, path)
    with pytest.raises(ValueError, match="could run code"):
        load_model(path)
    assert not (tmp_path / "booby_trap_ran").exists()
    # and a plain pickle (not a torch zip file) is refused too
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(_Trap(), fh)
    with pytest.raises(ValueError):
        load_model(tmp_path / "evil.pkl")
    assert not (tmp_path / "booby_trap_ran").exists()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openmm-starmd checkpoint"):
        load_model(tmp_path / "other.pt")
    net = random_network(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="JSON"):
        save_model(tmp_path / "m.pt", net, DiffusionConfig(), metadata={"bad": object()})
    with pytest.raises(FileNotFoundError, match="directory"):
        save_model(tmp_path / "missing_dir" / "m.pt", net, DiffusionConfig())


def test_bundled_default_is_named_or_explained():
    from openmm_starmd.checkpoints import bundled_model_path

    try:
        path = bundled_model_path("default")
    except FileNotFoundError as err:
        assert "not installed" in str(err)
        with pytest.raises(FileNotFoundError, match="save_model"):
            load_model()
    else:
        assert load_model().model_config is not None and path.name == BUNDLED_MODELS["default"]
    with pytest.raises(ValueError, match="bundled names"):
        bundled_model_path("huge")
