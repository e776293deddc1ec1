"""Kill a training run mid-way and resume it: shared by the stage-training tests (not a test file)."""
from __future__ import annotations

from pathlib import Path

import pytest

from latentdiff.errors import ConfigError
from latentdiff.train.loop import TrainingRun


class Killed(Exception):
    pass


def kill_then_resume(train, cfg, out: Path, monkeypatch, die_in_step: int = 5):
    """Run `train(cfg, out)` until it dies inside step `die_in_step` (after the checkpoint of the step
    before, with checkpoint_every=2), check that only whole checkpoints are on disk and that a plain
    restart is refused, then resume; returns what the resumed `train` returns."""
    real_log = TrainingRun.log

    def log_then_die(self, step, values):
        if step + 1 == die_in_step:
            raise Killed()
        real_log(self, step, values)

    monkeypatch.setattr(TrainingRun, "log", log_then_die)
    with pytest.raises(Killed):
        train(cfg, out)
    monkeypatch.setattr(TrainingRun, "log", real_log)
    done = die_in_step - 1
    expected = [f"step-{s:07d}" for s in range(2, done + 1, 2)][-2:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == expected  # nothing half-written
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg, out)
    return train(cfg, out, resume=True)
