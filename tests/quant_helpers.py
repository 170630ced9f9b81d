"""A linear layer whose inputs have a few salient channels, and its output error: the setting in
which AWQ and GPTQ are expected to beat round-to-nearest."""

import torch


def salient_layer(seed=0, k=256, n_out=128, n=256):
    torch.manual_seed(seed)
    channel_scale = torch.ones(k)
    channel_scale[torch.randperm(k)[:16]] = torch.rand(16) * 10 + 5  # a few salient input channels
    x = torch.randn(n, k) * channel_scale
    w = torch.randn(n_out, k) * 0.02
    return x, w


def output_error(x, w, w_hat):
    return float((x @ w.t() - x @ w_hat.t()).norm())
