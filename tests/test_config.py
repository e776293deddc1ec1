from pathlib import Path

import pytest

from latentdiff.config import apply_overrides, from_dict, load_config, parse_override, to_dict
from latentdiff.data.sources import DataConfig
from latentdiff.errors import ConfigError
from latentdiff.train.autoencoder import AutoencoderTrainingConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  ch: 32\n  chmult: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.chmult'"):
        load_config(AutoencoderTrainingConfig, path)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        apply_overrides(AutoencoderTrainingConfig(), ["train.stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        apply_overrides(AutoencoderTrainingConfig(), ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"data.crop: 'middle' is not one of"):
        from_dict(DataConfig, {"crop": "middle"}, "data")


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(AutoencoderTrainingConfig(), ["model.ch_mult=[1,2,4]", "train.lr=1e-3",
                                                        "loss.recon=l2", "data.flip=true"])
    assert cfg.model.ch_mult == (1, 2, 4) and cfg.train.lr == 1e-3
    assert cfg.loss.recon == "l2" and cfg.data.flip is True
    assert parse_override("data.source=my images") == ("data.source", "my images")


def test_no_and_off_are_strings_not_booleans(tmp_path):
    # YAML 1.1 reads `no` as False; mixed_precision=no used to fail with "expected a string, got False".
    assert apply_overrides(AutoencoderTrainingConfig(), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  flip: true\n")
    cfg = load_config(AutoencoderTrainingConfig, path)
    assert cfg.train.mixed_precision == "no" and cfg.data.flip is True
    with pytest.raises(ConfigError, match="data.flip: expected true or false, got 'yes'"):
        apply_overrides(AutoencoderTrainingConfig(), ["data.flip=yes"])


def test_round_trip_through_dict():
    cfg = AutoencoderTrainingConfig()
    assert from_dict(AutoencoderTrainingConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("autoencoder/*.yaml")), ids=lambda p: p.name)
def test_shipped_autoencoder_presets_load(path):
    load_config(AutoencoderTrainingConfig, path)


def test_default_preset_file_equals_the_dataclass_defaults():
    assert load_config(AutoencoderTrainingConfig, CONFIGS / "autoencoder" / "shapes.yaml") == AutoencoderTrainingConfig()
