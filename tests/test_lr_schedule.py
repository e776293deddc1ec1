"""The learning-rate schedule every trainer uses: warm-up, constant or cosine, optional linear cooldown."""
import math

import pytest

from latentdiff.errors import ConfigError
from latentdiff.train.loop import TrainConfig
from latentdiff.train.optim import lr_scale


def test_warmup_then_constant():
    train = TrainConfig(steps=100, warmup_steps=10)
    assert [lr_scale(train, s) for s in (0, 4, 9, 50, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]


def test_cosine_reaches_zero_at_the_last_step():
    train = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_scale(train, 10) == 1.0
    assert math.isclose(lr_scale(train, 60), 0.5)
    assert lr_scale(train, 109) < 0.001


def test_cooldown_takes_the_last_steps_linearly_down():
    train = TrainConfig(steps=100, warmup_steps=10, cooldown_fraction=0.2)
    assert lr_scale(train, 79) == 1.0
    assert [lr_scale(train, s) for s in (80, 90, 99)] == [1.0, 0.5, 0.05]
    short = TrainConfig(steps=6, warmup_steps=1, cooldown_fraction=0.25)  # a share, so any --steps works
    assert [lr_scale(short, s) for s in range(6)] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5]


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_a_cooldown_outside_0_and_1_is_refused(fraction):
    with pytest.raises(ConfigError, match="train.cooldown_fraction"):
        TrainConfig(steps=10, cooldown_fraction=fraction)
