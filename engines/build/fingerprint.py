"""The model folder's fingerprint: what both builders (torch, TensorRT-LLM) put into their build hash and
manifest, so that changed model files mean a rebuilt engine."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from engines.build.manifest import sha256_file

# the files that define a model: weights, configs, tokenizer, chat template
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".model", ".jinja", ".txt")


def model_fingerprint(folder: Path) -> str:
    """sha256 over the model's files; hashed once per build (the cache key includes sizes and mtimes)."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES)
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode())
        digest.update(sha256_file(Path(name)).encode())
    return digest.hexdigest()
