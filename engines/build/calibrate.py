"""Calibration, one decoder layer at a time: run the calibration prompts' residual streams through a float layer
and keep, for each of its projections' inputs and for its KV cache, the statistics the chosen quantization needs.

What each consumer reads (Needs):
- AWQ: a random subsample of input rows per projection (its scale and clip searches run on it);
- GPTQ: the Hessian 2 X^T X / n per projection, accumulated exactly over every token;
- SmoothQuant: per-channel max |x| per projection input;
- static KV-cache scales: per layer, K/V and KV head, max |x| over every token (min-max) or, for the
  percentile and entropy calibrators, a subsample of K/V values.

The build (engines/build/candidate.py) calibrates layer i on the outputs of the already quantized layers before it,
as GPTQ implementations do: each layer's quantization then corrects the error the ones before it left, and the
statistics of only one layer are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engines.build.stream import LayerRunner
from engines.quant import calibrators
from engines.quant.calibrators import RangeObserver

SAMPLE_ROWS = 1024  # rows of each projection's input kept for AWQ (and activation calibrators)
KV_SAMPLE_TOKENS = 2048  # tokens of K/V per layer kept for the percentile / entropy calibrators


@dataclass(frozen=True)
class Needs:
    samples: bool = False  # input-row subsample per projection
    hessian: bool = False
    channel_amax: bool = False
    kv: bool = False

    @property
    def anything(self) -> bool:
        return self.samples or self.hessian or self.channel_amax or self.kv


@dataclass
class ProjectionStats:
    rows_per_sequence: int
    samples: list[torch.Tensor] = field(default_factory=list)
    hessian: torch.Tensor | None = None  # running sum of 2 x^T x
    tokens: int = 0
    observer: RangeObserver | None = None

    def sample_matrix(self) -> torch.Tensor:  # [rows, K] float32
        return torch.cat(self.samples)

    def hessian_mean(self) -> torch.Tensor:  # [K, K]
        return self.hessian / max(self.tokens, 1)


class _Recorder(nn.Module):
    """Stands in for a projection during calibration: records its input, then calls it."""

    def __init__(self, inner: nn.Module, stats: ProjectionStats, needs: Needs, generator: torch.Generator):
        super().__init__()
        self.inner, self.stats, self.needs, self.generator = inner, stats, needs, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, K]
        xf = x.float()
        st = self.stats
        st.tokens += xf.shape[0]
        if self.needs.samples:
            k = min(st.rows_per_sequence, xf.shape[0])
            rows = torch.randperm(xf.shape[0], generator=self.generator)[:k]
            st.samples.append(xf[rows.to(xf.device)].cpu())
        if self.needs.hessian:
            h = 2.0 * (xf.t() @ xf)
            st.hessian = h if st.hessian is None else st.hessian + h
        if self.needs.channel_amax:
            st.observer = st.observer or RangeObserver()
            st.observer.update(xf)
        return self.inner(x)


class _KVWritten(Exception):
    """Raised by _StopAtOutput: the layer has written its keys and values, and nothing after is recorded."""


class _StopAtOutput(nn.Module):
    """Stands in for the attention's output projection when only the KV cache is calibrated: every architecture
    writes its KV cache in attention, before this projection, and the layer's outputs are not kept, so the MLP
    (most of a layer's work) need not run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise _KVWritten


@dataclass
class LayerCalibration:
    projections: dict[str, ProjectionStats]  # "layers.3.qkv_proj" -> stats
    kv_amax: torch.Tensor | None  # [2, kv_heads] float32, min-max over all tokens
    kv_samples: torch.Tensor | None  # [2, kv_heads, tokens * head_dim] float32 subsample

    def kv_range(self, calibrator: str) -> torch.Tensor:
        """Per K/V and head: the clipping threshold the calibrator picks ([2, kv_heads])."""
        if self.kv_amax is None:
            raise RuntimeError("the calibration pass did not record the KV cache")
        if calibrator == "minmax":
            return self.kv_amax
        pick = {"percentile": calibrators.percentile, "entropy": calibrators.entropy}[calibrator]
        out = torch.empty_like(self.kv_amax)
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in out.shape)).tolist():
            out[tuple(idx)] = pick(self.kv_samples[tuple(idx)])
        return out


@torch.inference_mode()
def calibrate_layer(
    runner: LayerRunner, index: int, inputs: list[torch.Tensor], needs: Needs, seed: int = 0
) -> LayerCalibration:
    """Run the residual streams `inputs` (one per calibration prompt) through layer `index` of runner's model (loaded
    in float32), recording what `needs` asks for. The layer's outputs are not kept."""
    model = runner.model
    layer = model.layers[index]
    generator = torch.Generator().manual_seed(seed * 100_003 + index)  # the same rows whatever ran before
    rows_per_sequence = max(1, -(-SAMPLE_ROWS // max(len(inputs), 1)))
    stats: dict[str, ProjectionStats] = {}
    originals = []
    for kind in model.projections:
        name = f"layers.{index}.{kind}"
        stats[name] = ProjectionStats(rows_per_sequence)
        inner = getattr(layer, kind)
        originals.append((kind, inner))
        setattr(layer, kind, _Recorder(inner, stats[name], needs, generator))
    if needs == Needs(kv=True):
        originals.append(("o_proj", layer.o_proj))
        layer.o_proj = _StopAtOutput()
    kv_amax = None
    kv_chunks: list[torch.Tensor] = []
    kv_per_sequence = max(1, -(-KV_SAMPLE_TOKENS // len(inputs)))
    try:
        for x in inputs:
            try:
                runner.forward(layer, x)
            except _KVWritten:
                pass
            if needs.kv:
                kv = runner.kv_values(x.shape[0])  # [2, kvh, T, hd]
                amax = kv.abs().float().amax(dim=(-1, -2))
                kv_amax = amax if kv_amax is None else torch.maximum(kv_amax, amax)
                pick = torch.randperm(x.shape[0], generator=generator)[:kv_per_sequence]
                kv_chunks.append(kv[:, :, pick.to(kv.device)].float().cpu().flatten(2))
    finally:
        for kind, inner in reversed(originals):  # o_proj: first its _StopAtOutput, then its _Recorder
            setattr(layer, kind, inner)
    kv_samples = torch.cat(kv_chunks, dim=-1) if kv_chunks else None
    return LayerCalibration(stats, kv_amax, kv_samples)
