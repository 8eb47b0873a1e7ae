import json

import pytest

from openmm_starmd.model.config import NAMED_CONFIGS, ModelConfig, model_config


def test_round_trip_through_json():
    c = ModelConfig(width=64, heads=4, attention="separable", fixed_dt_ns=0.1, contextual_noise=False)
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c


def test_named_configs():
    paper = model_config("paper")
    assert (paper.width, paper.heads) == (256, 8)
    assert paper.layer_kinds() == ["frame", "joint", "joint"] * 4
    default = model_config("default", window=4)
    assert default.window == 4 and set(default.layer_kinds()) == {"joint"}
    assert set(NAMED_CONFIGS) == {"paper", "default"}


def test_separable_replaces_each_joint_layer_by_space_then_time():
    c = ModelConfig(blocks=2, frame_layers=1, joint_layers=1, attention="separable")
    assert c.layer_kinds() == ["frame", "frame", "time"] * 2


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(attention="diagonal"), "attention"),
        (dict(width=30, heads=4), "divisible"),
        (dict(width=24, heads=4), "multiple of 4"),
        (dict(fixed_dt_ns=0.0), "fixed_dt_ns"),
        (dict(window=0), "window"),
    ],
)
def test_bad_values_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ModelConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="paper"):
        model_config("huge")


def test_default_inference_window_is_the_training_context():
    assert ModelConfig(window=8).context_frames == 7
    assert ModelConfig(window=1).context_frames == 1
