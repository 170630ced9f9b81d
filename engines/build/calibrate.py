"""The calibration pass: run calibration prompts through the float model and keep, for every
projection's input and for the KV cache, the statistics the chosen quantization needs.

What each consumer reads (Needs):
- AWQ: a random subsample of input rows per projection (its scale and clip searches run on it);
- GPTQ: the Hessian 2 X^T X / n per projection, accumulated exactly over every token;
- SmoothQuant: per-channel max |x| per projection input;
- static KV-cache scales: per layer, K/V and KV head, max |x| over every token (min-max) or, for the
  percentile and entropy calibrators, a subsample of K/V values.

One pass over the float model (not layer-by-layer on partially quantized layers): simpler, and the
statistics of every layer come from the same unquantized activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from engines.quant import calibrators
from engines.quant.calibrators import RangeObserver
from engines.torch.models.protocol import CausalLM
from engines.torch.sequence_runner import SequenceRunner

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


@dataclass
class CalibrationResult:
    projections: dict[str, ProjectionStats]  # "layers.3.qkv_proj" -> stats
    kv_amax: torch.Tensor | None  # [layers, 2, kv_heads] float32, min-max over all tokens
    kv_samples: torch.Tensor | None  # [layers, 2, kv_heads, tokens * head_dim] float32 subsample
    num_sequences: int
    num_tokens: int

    def kv_range(self, calibrator: str) -> torch.Tensor:
        """Per layer, K/V and head: the clipping threshold the calibrator picks ([layers, 2, kv_heads])."""
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
def calibrate(
    model: CausalLM,
    prompts: list[list[int]],
    needs: Needs,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Run `prompts` (token ids) through `model` once, recording what `needs` asks for."""
    generator = torch.Generator().manual_seed(seed)
    rows_per_sequence = max(1, -(-SAMPLE_ROWS // max(len(prompts), 1)))
    stats: dict[str, ProjectionStats] = {}
    originals = []
    for i, layer in enumerate(model.layers):
        for kind in model.projections:
            name = f"layers.{i}.{kind}"
            stats[name] = ProjectionStats(rows_per_sequence)
            inner = getattr(layer, kind)
            originals.append((layer, kind, inner))
            setattr(layer, kind, _Recorder(inner, stats[name], needs, generator))
    runner = SequenceRunner(model, dtype, device, max(len(p) for p in prompts))
    kv_amax = None
    kv_chunks: list[torch.Tensor] = []
    kv_per_sequence = max(1, -(-KV_SAMPLE_TOKENS // len(prompts)))
    tokens = 0
    try:
        for ids in tqdm(prompts, desc="calibrate", unit="prompt", disable=not progress):
            runner.hidden(ids)
            tokens += len(ids)
            if needs.kv:
                amax = runner.kv_amax(len(ids))
                kv_amax = amax if kv_amax is None else torch.maximum(kv_amax, amax)
                flat = runner.kv_cache.data.flatten(3, 4)[:, :, :, : len(ids)]  # [L, 2, kvh, T, hd]
                pick = torch.randperm(len(ids), generator=generator)[:kv_per_sequence]
                kv_chunks.append(flat[:, :, :, pick.to(flat.device)].float().cpu().flatten(3))
    finally:
        for layer, kind, inner in originals:
            setattr(layer, kind, inner)
    kv_samples = torch.cat(kv_chunks, dim=-1) if kv_chunks else None
    return CalibrationResult(stats, kv_amax, kv_samples, len(prompts), tokens)
