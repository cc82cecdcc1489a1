"""Config loading: unknown keys, impossible values and wrong types are refused with clear messages."""

import pytest

from comflp.asr.config import ConfigError, ModelConfig, config_from_dict, load_config

BASE = {"model": {"num_layers": 4, "interctc_layers": [2], "interctc_weight": 0.3}, "train": {}}


def with_model(**kw):
    return {"model": {**BASE["model"], **kw}, "train": {}}


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\ntrain:\n  lr: 1\n")
    cfg = load_config(path, {"model.d_model": 64, "train.num_epochs": 3})
    assert cfg.model.num_layers == 6 and cfg.model.d_model == 64
    assert cfg.train.num_epochs == 3
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"num_layer": 4}}, "unknown key(s) num_layer"),
        ({"modle": {}}, "unknown section(s) modle"),
        (with_model(interctc_layers=[2, 4]), "interctc_layers"),
        (with_model(interctc_layers=[0]), "interctc_layers"),
        (with_model(stochastic_depth_rate=1.0), "stochastic_depth_rate"),
        (with_model(stochastic_depth_rate=[0.1, 0.2]), "one rate per layer"),
        (with_model(d_model=100, num_heads=3), "divisible"),
        (with_model(interctc_weight=1.0), "interctc_weight"),
        (with_model(decoder_layers=1), "ctc_weight"),
        (with_model(ctc_upsample=0), "'ctc_upsample' must be an integer >= 1"),
        (with_model(num_layers="six"), "'num_layers' must be int"),
        ({"train": {"lr": "1e-3"}}, "'lr' must be float"),
        ({"train": {"average_by": "worst"}}, "average_by"),
        ({"train": {"num_epochs": 0}}, "num_epochs"),
    ],
)
def test_bad_configs_are_refused(data, message):
    with pytest.raises(ConfigError, match=None) as err:
        config_from_dict(data, "conf/x.yaml")
    assert message in str(err.value)
    assert "conf/x.yaml" in str(err.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_linear_stochastic_depth_schedule():
    cfg = ModelConfig(num_layers=4, stochastic_depth_rate=0.2)
    assert cfg.layer_drop_rates() == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert ModelConfig(num_layers=2, stochastic_depth_rate=[0.0, 0.3]).layer_drop_rates() == [
        0.0,
        0.3,
    ]
