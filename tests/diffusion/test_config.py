"""DiffusionConfig (openmm_starmd/diffusion/config.py): FrameDiff defaults, JSON round trip, clear errors."""
import json

import pytest

from openmm_starmd.diffusion import DiffusionConfig


def test_defaults_are_framediffs_in_nanometres():
    c = DiffusionConfig()
    assert (c.trans_beta_min, c.trans_beta_max) == (0.1, 20.0)
    assert (c.rot_sigma_min, c.rot_sigma_max) == (0.1, 1.5)
    assert c.coordinate_scale_nm == 1.0 and c.t_min == 0.01 and c.context_tau_max == 0.1


def test_json_round_trip():
    c = DiffusionConfig(rot_sigma_max=3.0, t_min=0.005, coordinate_scale_nm=0.5)
    again = DiffusionConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_missing_fields_take_defaults():
    assert DiffusionConfig.from_dict({"t_min": 0.02}) == DiffusionConfig(t_min=0.02)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown keys \['beta_typo'\]"):
        DiffusionConfig.from_dict({"beta_typo": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"coordinate_scale_nm": 0.0}, "coordinate_scale_nm"),
        ({"trans_beta_min": 30.0}, "trans_beta_min < trans_beta_max"),
        ({"rot_sigma_min": 0.0}, "rot_sigma_min"),
        ({"t_min": 1.0}, "t_min"),
        ({"context_tau_max": -0.1}, "context_tau_max"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**kwargs)
