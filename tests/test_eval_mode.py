"""in_eval_mode: a module evaluates in eval mode and leaves in the mode it came in, also after an error."""
import pytest
import torch

from latentdiff.eval_mode import in_eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_restores_the_mode_it_found(training):
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3)).train(training)
    with in_eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert all(m.training == training for m in model.modules())


def test_restores_training_mode_when_the_block_raises():
    model = torch.nn.Dropout(0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with in_eval_mode(model):
            raise RuntimeError("boom")
    assert model.training
