"""A GGUF file's Q4_1 projections under kiln's tensor names, as the file stores them (format int4-affine).

Why: a GGUF model is converted once to a Hugging Face folder of dequantized weights (engines/model_source.py), which
is what every other path reads. For Q4_1 blocks the dequantized weights are exactly d * u + m, so serving the codes
(AffineInt4Linear) loses nothing and reads 5 bits per weight instead of int8's 8 (engines/torch/load_quantization.py
chooses it). A projection kind is taken from the file only when every layer stores every part of it as Q4_1
(quantized files often keep some tensors at other types); the caller serves the other kinds its own way.

Rows: llama.cpp's converter permutes the rows of q and k for its RoPE layout and transformers permutes them back
when it reads the file (its LlamaTensorProcessor). The same permutation is applied here to the codes and their
(d, m) pairs, taken from transformers' own processor applied to the row numbers, so the two paths cannot drift.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from engines.torch.kernels.int_linear import pack_int4
from engines.torch.layers.formats import GGUF_BLOCK

log = logging.getLogger("kiln.engine")

FORMAT = "int4-affine"
# kiln's projection kind -> the GGUF tensors its rows are made of, in order
PARTS = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}
_Q4_1_BYTES = 20  # one block: float16 d, float16 m, 16 bytes of nibbles (elements j and j + 16 share byte j)


class GgufBlockError(ValueError):
    """A tensor of the file is not what its header says."""


def q4_1_projections(path: Path, num_layers: int, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """{"layers.{i}.{kind}.qweight_packed": ..., "...dm": ...} for each projection kind stored as Q4_1 throughout
    the file at `path` (possibly none)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
        config={"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads}
    )
    out: dict[str, torch.Tensor] = {}
    for kind, parts in PARTS.items():
        names = [[f"blk.{i}.{part}.weight" for part in parts] for i in range(num_layers)]
        if not all(
            n in by_name and by_name[n].tensor_type == gguf.GGMLQuantizationType.Q4_1 for row in names for n in row
        ):
            continue
        for i, layer_names in enumerate(names):
            blocks = [_read_q4_1(by_name[n], processor) for n in layer_names]
            u = torch.cat([b[0] for b in blocks])
            out[f"layers.{i}.{kind}.qweight_packed"] = pack_int4((u.to(torch.int16) - 8).to(torch.int8))
            out[f"layers.{i}.{kind}.dm"] = torch.cat([b[1] for b in blocks]).contiguous()
    return out


def _read_q4_1(tensor, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K], (d, m) float16 [N, K / 32, 2]) of one Q4_1 tensor, rows in transformers' order."""
    cols, rows = (int(d) for d in tensor.shape[:2])  # GGUF lists the fastest-varying dimension first
    if cols % GGUF_BLOCK:
        raise GgufBlockError(f"GGUF tensor {tensor.name!r} has {cols} columns, not a multiple of {GGUF_BLOCK}.")
    raw = np.asarray(tensor.data)
    if raw.dtype != np.uint8 or raw.size != rows * cols // GGUF_BLOCK * _Q4_1_BYTES:
        raise GgufBlockError(f"GGUF tensor {tensor.name!r} holds {raw.nbytes} bytes, not {rows} rows of Q4_1 blocks.")
    blocks = raw.reshape(rows, cols // GGUF_BLOCK, _Q4_1_BYTES)
    dm = blocks[..., :4].copy().view(np.float16)  # [N, G, 2]
    nibbles = blocks[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)  # elements j, then j + 16
    order = _row_order(tensor.name, rows, processor)
    return torch.from_numpy(codes[order].copy()), torch.from_numpy(dm[order].copy())


def _row_order(name: str, rows: int, processor) -> np.ndarray:
    """The row permutation transformers applies to this tensor when it reads the file."""
    moved = processor.process(weights=np.arange(rows, dtype=np.int64).reshape(rows, 1), name=name).weights
    order = np.asarray(moved).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        raise GgufBlockError(
            f"transformers reshapes GGUF tensor {name!r} beyond a row permutation; kiln cannot keep its blocks."
        )
    return order


# in the converted checkpoint's folder, below it: read_checkpoint takes every *.safetensors file at its top as
# the checkpoint's. v2: this module's tensor layout (float16 pairs).
CACHE_FILE = "kiln/q4_1-blocks-v2.safetensors"


def cached_q4_1_projections(
    path: Path, folder: Path, num_layers: int, num_heads: int, num_kv_heads: int
) -> dict[str, torch.Tensor]:
    """q4_1_projections of the GGUF file at `path`, kept in its converted folder (engines/model_source.py keys that
    folder by the file) so that later starts read them in well under a second: parsing the file's metadata and
    packing the codes takes seconds."""
    from safetensors.torch import load_file, save_file

    cache = folder / CACHE_FILE
    if cache.is_file():
        return load_file(str(cache))
    out = q4_1_projections(path, num_layers, num_heads, num_kv_heads)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        cache.parent.mkdir(exist_ok=True)
        save_file(out, str(tmp))
        tmp.rename(cache)  # atomic: a concurrent start reads the whole file or computes its own
    except OSError as exc:  # a read-only cache: serve on, recomputing at every start
        log.warning("could not keep the GGUF blocks in %s (%s); later starts will read the GGUF file again", cache, exc)
        tmp.unlink(missing_ok=True)
    return out
