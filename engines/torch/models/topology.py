"""Where a decoder layer's projections get their inputs, as data: what SmoothQuant and AWQ need to fold a
per-input-channel scale s into the op that produces a projection's input, so that W x = (W diag(s)) (x / s)
holds exactly and only the scaled weight is quantized.

Two kinds of producer:
- a norm (NormGroup): its weight multiplies every channel it outputs, so dividing the weight by s scales
  the input of every projection reading it; those consumers must share one s;
- another projection's output rows (RowFold): the consumer's input channel j is (a function that is
  linear per channel of) one row of the producer's weight, e.g. down_proj reads silu(gate) * up, so
  scaling the `up` rows by 1/s scales down_proj's input channel by channel.

Folds run before their producers are quantized; `QuantTopology.row_folds` is listed in that order.

A projection whose input no per-channel op produces (OLMo 2's qkv and gate_up read the residual stream itself:
its norms come after each sublayer) is listed as `unfolded`: SmoothQuant leaves it unsmoothed and AWQ searches
only its clip. Every projection is named exactly once, so an architecture cannot drop one by omission.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NormGroup:
    norm: str  # per-layer norm weight, kiln name without the layer prefix ("input_norm")
    consumers: tuple[str, ...]  # the projections that read its output


@dataclass(frozen=True)
class RowFold:
    consumer: str  # the projection whose input is scaled ("down_proj")
    producer: str  # the projection whose output rows make that input ("gate_up_proj")
    # rows of the producer's weight holding the consumer's input channels, for these model args; None where
    # no exact fold exists (grouped-query attention: one v channel feeds several o_proj channels)
    rows: Callable[[Any], slice | None]
    smooth: bool = True  # whether SmoothQuant migrates this input's outliers too (AWQ always uses a fold)
    # multiply the rows by 1/s instead of dividing them by s: Llama's `up` rows always have been, and
    # engines built before and after this seam stay bit-identical (the two round differently)
    reciprocal: bool = False


@dataclass(frozen=True)
class QuantTopology:
    norm_groups: tuple[NormGroup, ...]
    row_folds: tuple[RowFold, ...]
    unfolded: tuple[str, ...] = ()  # projections whose input has no producer a scale folds into exactly

    def named(self) -> list[str]:
        """Every projection the topology places, once per place (the build checks each appears once)."""
        return (
            [kind for g in self.norm_groups for kind in g.consumers]
            + [f.consumer for f in self.row_folds]
            + list(self.unfolded)
        )
