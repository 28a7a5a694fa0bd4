"""Derived settings of MapConfig: the control models' learning rate and the gradient stages' batch."""

import pytest

from tl_taskmap.report.config import CONTROL_LR, GRADIENT_BATCH, ConfigError, MapConfig


def test_control_learning_rate_follows_what_the_controls_train():
    assert MapConfig().control_neurons == "lora"  # the paper's controls: LoRA on q and v
    assert MapConfig().control_learning_rate == CONTROL_LR["lora"] == 2e-3
    assert MapConfig(control_neurons="full").control_learning_rate == 1e-4
    assert MapConfig(control_neurons="task", control_lr=3e-4).control_learning_rate == 3e-4
    MapConfig(control_lr=None).validate()
    with pytest.raises(ConfigError, match="control_lr must be positive"):
        MapConfig(control_lr=0.0).validate()
    with pytest.raises(ConfigError, match="control_neurons must be one of"):
        MapConfig(control_neurons="lorra").validate()


@pytest.mark.parametrize("batch_size, expected", [(1, 1), (GRADIENT_BATCH, GRADIENT_BATCH), (16, GRADIENT_BATCH)])
def test_gradient_stages_take_at_most_gradient_batch_rows(batch_size, expected):
    assert MapConfig(batch_size=batch_size).gradient_batch_size == expected
