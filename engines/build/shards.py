"""An engine's stored tensors written as the build makes them, one safetensors shard per decoder layer (and one for
the outer tensors), then joined into the engine's one weights.safetensors by copying each tensor's bytes: at no
point does the build hold more than one shard's tensors.

The joined file is an ordinary safetensors file (an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then the data), which load_file and the
engine loader read as they read save_file's.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Shards:
    """Shards in a folder of their own (removed by `discard`)."""

    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder = folder
        self.files: list[Path] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"shard-{len(self.files):05d}.safetensors"
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, path)
        self.files.append(path)

    def load_all(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every tensor (the decode-speed measurement runs the whole quantized model)."""
        out: dict[str, torch.Tensor] = {}
        for path in self.files:
            out.update(load_file(str(path), device=str(device)))
        return out

    def join(self, path: Path, metadata: dict[str, str]) -> None:
        """Write every shard's tensors into the one safetensors file `path`."""
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    nbytes = _nbytes(view.get_shape(), view.get_dtype())
                    header[name] = {
                        "dtype": view.get_dtype(),
                        "shape": view.get_shape(),
                        "data_offsets": [offset, offset + nbytes],
                    }
                    offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for file in self.files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name).contiguous()
                        out.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


def _nbytes(shape: list[int], dtype: str) -> int:
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"the engine writer does not know the safetensors dtype {dtype}")
    n = _DTYPE_BYTES[dtype]
    for dim in shape:
        n *= dim
    return n
