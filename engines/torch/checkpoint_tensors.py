"""A checkpoint folder's safetensors tensors by name, each read when it is taken (so a reader holds in memory only
what it has taken and converted so far, and a pre-quantized checkpoint's int32 codes are never cast to a float
dtype on the way in)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointTensors:
    """Use as a context manager: the files stay open while tensors are taken."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files = sorted(folder.glob("*.safetensors"))
        if not self._files:
            raise FileNotFoundError(f"{folder} holds no *.safetensors weights.")
        self._stack = ExitStack()
        self._where: dict[str, object] = {}

    def __enter__(self) -> CheckpointTensors:
        for file in self._files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():
                self._where[name] = handle
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """The names not taken yet."""
        return list(self._where)

    def take(self, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The tensor `name` (as stored unless `dtype` is given), removed from what is left to take."""
        if name not in self._where:
            raise KeyError(f"Checkpoint in {self.folder} lacks tensor {name!r}.")
        tensor = self._where.pop(name).get_tensor(name)  # type: ignore[attr-defined]
        return tensor.to(device=device, dtype=dtype) if dtype is not None or device is not None else tensor

    def take_optional(self, name: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor | None:
        return self.take(name, dtype, device) if name in self._where else None
