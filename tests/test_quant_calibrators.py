"""Activation-range calibrators."""

import torch

from engines.quant.calibrators import RangeObserver, entropy, minmax, percentile


def _heavy_tailed():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((50000,))
    x[:3] = torch.tensor([100.0, -120.0, 150.0])  # a few huge outliers
    return x


def test_entropy_tighter_than_percentile_tighter_than_minmax():
    x = _heavy_tailed()
    mm, pc, en = minmax(x), percentile(x, 99.99), entropy(x)
    assert mm == 150.0
    assert 0 < en < pc < mm, (en, pc, mm)
    assert en < mm / 4


def test_entropy_keeps_full_range_without_outliers():
    torch.manual_seed(0)
    x = torch.rand(20000) * 2 - 1  # uniform: clipping only loses information
    assert entropy(x) > 0.9 * minmax(x)


def test_calibrators_accept_batches():
    x = _heavy_tailed()
    batches = list(x.split(10000))
    assert minmax(batches) == minmax(x)
    assert percentile(batches, 99.0) == percentile(x, 99.0)


def test_range_observer_streams_per_channel_stats():
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 16) * torch.arange(1, 17) for _ in range(4)]
    obs = RangeObserver()
    for b in batches:
        obs.update(b)
    full = torch.cat([b.reshape(-1, 16) for b in batches])
    assert torch.equal(obs.amax, full.abs().amax(0))
    assert torch.allclose(obs.mean_abs, full.abs().mean(0), rtol=1e-5)
    assert obs.count == 84
    assert torch.equal(minmax(batches, per_channel=True), obs.amax)
