"""`kiln build` reads the float model a layer at a time, so its peak RSS does not grow with the model's depth: the
same width at 2 and 8 layers (random float32 weights), each built in its own process, peaks within two layers'
float32 bytes of each other, where loading the float model whole adds six. bench/build_memory.py measures 8 and
32 layers of a wider model the same way. Two builds in processes of their own take minutes on a small machine, so
`make test` leaves this folder out (norecursedirs): `make test-build-memory` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.build_memory import REPO, build_peak_rss, write_random_llama

pytestmark = pytest.mark.build_memory

HIDDEN, INTERMEDIATE, HEADS = 768, 2048, 12  # 7.1M parameters, 28 MiB of float32 per layer


def test_peak_rss_does_not_grow_with_depth(tmp_path: Path):
    peaks, sizes = {}, {}
    for depth in (2, 8):
        model = tmp_path / f"model-{depth}"
        sizes[depth] = write_random_llama(model, depth, HIDDEN, INTERMEDIATE, HEADS)
        peaks[depth] = build_peak_rss(REPO, model, tmp_path / f"engine-{depth}", "int8-sq", tmp_path)
    layer = (sizes[8] - sizes[2]) / 6
    growth = peaks[8] - peaks[2]
    print(f"peak RSS 2 layers {peaks[2] >> 20} MiB, 8 layers {peaks[8] >> 20} MiB; a layer {layer / (1 << 20):.0f} MiB")
    assert growth < 2 * layer
