"""msa.config: overrides of the benchmarks' --set."""

import pytest

from msa.config import ConfigError, apply_overrides, load_config, validate


def test_overrides_set_typed_values_in_nested_sections_without_touching_the_input():
    config = {"finetune": {"epochs": 30}, "model": {}}
    out = apply_overrides(config, ["finetune.epochs=60", "model.encoder_widths=[128, 64]",
                                   "calibrate.faint_copies.enabled=false"])
    assert out["finetune"]["epochs"] == 60
    assert out["model"]["encoder_widths"] == [128, 64]
    assert out["calibrate"]["faint_copies"]["enabled"] is False
    assert config == {"finetune": {"epochs": 30}, "model": {}}


def test_overridden_demo_config_still_validates():
    config = apply_overrides(load_config("config/config.yaml"), ["finetune.mask_prediction=true"])
    assert validate(config)["finetune"]["mask_prediction"] is True


@pytest.mark.parametrize("bad", ["finetune.epochs", "=3", "finetune.epochs.inner=3"])
def test_malformed_override_names_itself(bad):
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({"finetune": {"epochs": 30}}, [bad])
