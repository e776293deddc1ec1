"""The weight EMA: each update moves every parameter by the warmed-up decay, and copies buffers."""
import torch
from torch import nn

from latentdiff.train.ema import EMA


def test_each_update_follows_the_warmed_up_decay_for_every_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMA(model, decay=0.9)
    expected = [p.detach().double().clone() for p in model.parameters()]
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics
        ema.update(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [e * decay + p.detach().double() * (1 - decay) for e, p in zip(expected, model.parameters())]
        for e, got in zip(expected, ema.shadow.parameters()):
            torch.testing.assert_close(got.double(), e, rtol=0, atol=1e-6)
        for b, got in zip(model.buffers(), ema.shadow.buffers()):
            assert torch.equal(got, b)
    assert all(not p.requires_grad for p in ema.shadow.parameters())


def test_following_another_model_lists_its_tensors_afresh():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    ema = EMA(first, decay=0.0)  # decay 0: the shadow becomes the followed weights
    ema.update(first)
    ema.update(second)
    for got, want in zip(ema.shadow.parameters(), second.parameters()):
        assert torch.equal(got, want)
