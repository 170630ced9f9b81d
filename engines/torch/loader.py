"""Load a model for the torch engine and size its KV cache from the memory budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engines import cpu_isa
from engines.build.manifest import Manifest
from engines.config import EngineConfig, default_batched_tokens
from engines.model_source import gguf_file, model_display_name, resolve_model
from engines.torch import host_malloc, load_quantization, prequantized
from engines.torch.block_manager import BlockManager
from engines.torch.grammar import Grammars
from engines.torch.layers.linear import DenseLinear
from engines.torch.llm_engine import LLMEngine
from engines.torch.model_runner import KVCache, ModelRunner
from engines.torch.models.protocol import CausalLM
from engines.torch.models.registry import architecture
from engines.torch.prequantized.kv_scales import CODE_MAX, convert_kv_scales
from engines.torch.scheduler import Scheduler

log = logging.getLogger("kiln.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class LoadedModel:
    model: CausalLM
    hf_config: object
    tokenizer: object
    name: str
    folder: Path
    dtype: torch.dtype
    device: torch.device
    manifest: Manifest | None = None  # engine.json when loaded from an engine directory
    # the KV-cache dtype and scales its engine directory asks for (used when it serves as a draft)
    kv_cache_dtype: str = "model"
    kv_cache_scales: torch.Tensor | None = None
    quantization: str | None = None  # the scheme a model folder was quantized with at load (load_quantization)
    # a pre-quantized folder's KV-cache scales ([layers, 2, kv_heads]) and the KV dtype they were computed for: an
    # int8 or fp8 KV cache asked for (--kv-cache-dtype) uses them (prequantized/kv_scales.py)
    checkpoint_kv_scales: torch.Tensor | None = None
    checkpoint_kv_dtype: str = "fp8"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU.")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 only where the CPU computes it natively (AVX512-BF16 or AMX-BF16, after KILN_CPU_ISA). oneDNN also
    # "supports" bf16 on any AVX-512 CPU by emulation, and there (Ice Lake) bf16 served 132 tok/s at c=32
    # against float32's 198, with TTFT 1.89 s against 0.77 s (docs/performance.md).
    return torch.bfloat16 if cpu_isa.native_bf16(cpu_isa.cpu_flags()) else torch.float32


def load_model(config: EngineConfig) -> LoadedModel:
    """A model folder (config.model) as dense weights (quantized at load with config.quantization; a folder whose
    config.json has a quantization_config in its stored format, engines/torch/prequantized), or a built engine
    (config.engine_dir)."""
    if config.engine_dir is not None:
        return load_engine_dir(config)
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_model(config.model)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    hf_config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    method = prequantized.quant_method(hf_config)
    if method is not None:  # stored quantized: its own format wins over any load-time scheme
        prequantized.check_requested(config.quantization, method)
        model, stored = prequantized.load_prequantized(folder, hf_config, dtype, device)
        name = config.served_model_name or model_display_name(config.model)
        return LoadedModel(
            model,
            hf_config,
            tokenizer,
            name,
            folder,
            dtype,
            device,
            quantization=method,
            checkpoint_kv_scales=stored.kv_scales,
            checkpoint_kv_dtype=stored.kv_dtype,
        )
    quantization = load_quantization.resolve(config, device)
    if quantization is None:
        model = load_checkpoint(folder, hf_config, dtype, device)
    else:
        gguf = gguf_file(config.model) if quantization == "gguf" else None
        model = load_quantization.load_quantized(folder, hf_config, quantization, dtype, device, gguf)
    name = config.served_model_name or model_display_name(config.model)
    return LoadedModel(model, hf_config, tokenizer, name, folder, dtype, device, quantization=quantization)


def load_engine_dir(config: EngineConfig) -> LoadedModel:
    """An engine directory written by `kiln build`: its manifest is checked (schema, checksums, hardware)
    before anything loads, and the stored (already quantized) weights become their runtime modules. The
    engine's KV-cache dtype and calibrated scales travel in the LoadedModel (see kv_cache_settings)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from engines.build import manifest as mf
    from engines.hardware import detect

    folder = Path(config.engine_dir).expanduser()
    manifest = mf.load_manifest(folder)
    if manifest.backend != "torch":
        raise mf.EngineDirError(f"{folder} holds a {manifest.backend} engine; kiln's torch backend cannot run it.")
    device = pick_device(config.device)
    mf.check_hardware(manifest, detect(device.type))
    dtype = torch.float32 if manifest.dtype == "float32" else pick_dtype(config.dtype, device)
    hf_config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # safetensors hands out views at arbitrary byte offsets; torch's int8 CPU kernel crashes on an
    # unaligned weight (seen on torch 2.13), so every tensor gets its own 64-byte-aligned copy.
    tensors = {name: _aligned(t) for name, t in load_file(str(folder / mf.WEIGHTS), device=str(device)).items()}
    scales = tensors.pop("kv_cache.scales", None)
    arch = architecture(hf_config.model_type)
    model = arch.assemble(arch.args_from_config(hf_config), tensors, manifest.weight_formats, dtype, device)
    name = config.served_model_name or manifest.served_model_name or _engine_model_name(manifest, folder)
    return LoadedModel(
        model, hf_config, tokenizer, name, folder, dtype, device, manifest, manifest.kv_cache_dtype, scales
    )


def load_checkpoint(folder: Path, hf_config, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """A Hugging Face checkpoint folder as a dense model of its architecture (every weight exists in memory once)."""
    arch = architecture(hf_config.model_type)
    args = arch.args_from_config(hf_config)
    return arch.assemble(args, arch.read_checkpoint(folder, args, dtype, device), {}, dtype, device)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _engine_model_name(manifest: Manifest, folder: Path) -> str:
    source = manifest.model.source
    return model_display_name(None if source.startswith("embedded:") else source) if source else folder.name


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids = getattr(loaded.hf_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return DEFAULT_CPU_KV_BYTES


def build_core(config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None = None) -> LLMEngine:
    """Allocate the KV pool for `loaded` and wire scheduler, block manager and runner together (and the
    speculative proposer: `draft` is the draft model, loaded from config.speculative_draft when None)."""
    config.validate()
    if loaded.device.type == "cpu":
        host_malloc.tune()  # activations of every step are host memory here
    args = loaded.model.args
    kv_cache_dtype, kv_scales = kv_cache_settings(config, loaded)
    if kv_cache_dtype == "model":
        kv_scales = None
    if kv_cache_dtype == "int8" and kv_scales is None:
        raise ValueError(KVCache.INT8_NEEDS_SCALES)
    if kv_scales is not None and tuple(kv_scales.shape) != (args.num_layers, 2, args.num_kv_heads):
        raise ValueError(
            f"kv_cache_scales has shape {list(kv_scales.shape)} but this model needs "
            f"[{args.num_layers}, 2, {args.num_kv_heads}] (layers, key/value, KV heads)."
        )
    kv_dtype = KVCache.storage_dtype(kv_cache_dtype, loaded.dtype)
    per_block = KVCache.bytes_per_block(args.num_layers, config.block_size, args.num_kv_heads, args.head_dim, kv_dtype)
    num_blocks = kv_budget_bytes(config, loaded.device) // per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory of {kv_budget_bytes(config, loaded.device)} bytes holds fewer than 2 KV blocks "
            f"({per_block} bytes each); raise it."
        )
    capacity = num_blocks * config.block_size
    model_limit = args.max_position_embeddings  # a sliding window is a mask over a cache of every token: no limit
    if config.max_model_len is not None:
        if config.max_model_len > model_limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit of {model_limit} tokens.")
        if config.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {config.max_model_len} needs more KV cache than the pool holds ({capacity} tokens); "
                "raise kv_cache_memory or lower max_model_len."
            )
        max_model_len = config.max_model_len
    else:
        max_model_len = min(model_limit, capacity)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    loaded.model.init_rope(max_model_len, loaded.dtype, loaded.device)
    graphs = decode_graphs(config, loaded.device)
    kv_cache = KVCache(
        args.num_layers,
        num_blocks,
        config.block_size,
        args.num_kv_heads,
        args.head_dim,
        loaded.dtype,
        loaded.device,
        kv_cache_dtype,
        kv_scales,
        scratch_block=graphs,
    )
    bm = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    budget = config.max_num_batched_tokens or default_batched_tokens(loaded.device)
    scheduler = Scheduler(bm, config.max_num_seqs, budget)
    runner = ModelRunner(
        loaded.model, kv_cache, config.block_size, loaded.device, config.max_num_seqs, max_model_len, graphs
    )
    log_kernels(runner)
    proposer = make_proposer(config, loaded, draft, num_blocks, max_model_len)
    eos = eos_token_ids(loaded)
    return LLMEngine(
        runner,
        bm,
        scheduler,
        eos,
        args.vocab_size,
        max_model_len,
        proposer,
        config.num_speculative_tokens if proposer else 0,
        grammars=lambda: Grammars(loaded.tokenizer, args.vocab_size, eos),
    )


def log_kernels(runner: ModelRunner) -> None:
    """Which kernels the engine chose at load (each op's choice is made once, see attention_backend and
    layers/linear.LinearDispatch)."""
    dense = next((m.dispatch for m in runner.model.modules() if isinstance(m, DenseLinear)), None)
    log.info(
        "Kernels: attention %s; dense linear layers: %s",
        runner.attention.describe(),
        dense.describe() if dense else "none",
    )


def kv_cache_settings(config: EngineConfig, loaded: LoadedModel) -> tuple[str, torch.Tensor | None]:
    """The KV-cache dtype and scales to build with: a built engine's own (its manifest and calibrated scales
    decide them), else the config's, with a pre-quantized checkpoint's own scales when the config gives none."""
    if loaded.manifest is not None:
        return loaded.kv_cache_dtype, loaded.kv_cache_scales
    wanted = config.kv_cache_dtype
    if config.kv_cache_scales is None and loaded.checkpoint_kv_scales is not None and wanted in CODE_MAX:
        return wanted, convert_kv_scales(loaded.checkpoint_kv_scales, loaded.checkpoint_kv_dtype, wanted)
    return wanted, config.kv_cache_scales


def decode_graphs(config: EngineConfig, device: torch.device) -> bool:
    """CUDA graphs for decode steps (model_runner.DecodeGraphs): on CUDA unless config.enforce_eager."""
    return device.type == "cuda" and not config.enforce_eager


def make_proposer(
    config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None, num_blocks: int, max_model_len: int
):
    """None, an NgramProposer, or a DraftModelProposer whose own KV pool has as many blocks as the target's
    (a draft never holds more tokens than its target sequences, plus k)."""
    if config.speculative_method == "ngram":
        from engines.torch.spec.ngram import NgramProposer

        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.speculative_method != "draft":
        return None
    from engines.torch.spec.draft_model import DraftModelProposer

    if draft is None:
        if config.speculative_draft is None:
            raise ValueError(
                "speculative decoding with a draft model needs the draft: give --speculative-draft "
                "an engine directory (e.g. one built with `kiln build --draft-of`) or a model folder."
            )
        draft = load_draft(config)
    check_draft(loaded, draft)
    dargs = draft.model.args
    draft.model.init_rope(max_model_len, draft.dtype, draft.device)
    graphs = decode_graphs(config, draft.device)
    kv = KVCache(
        dargs.num_layers,
        num_blocks,
        config.block_size,
        dargs.num_kv_heads,
        dargs.head_dim,
        draft.dtype,
        draft.device,
        draft.kv_cache_dtype,
        draft.kv_cache_scales,
        scratch_block=graphs,
    )
    runner = ModelRunner(draft.model, kv, config.block_size, draft.device, config.max_num_seqs, max_model_len, graphs)
    description = {
        "draft_model": draft.name,
        "draft_source": str(config.speculative_draft or draft.folder),
        "draft_precision": draft.manifest.precision if draft.manifest else str(draft.dtype).removeprefix("torch."),
    }
    return DraftModelProposer(
        runner, BlockManager(num_blocks, config.block_size, enable_prefix_caching=False), description
    )


def load_draft(config: EngineConfig) -> LoadedModel:
    from engines.build.manifest import is_engine_dir

    source = config.speculative_draft
    as_engine = is_engine_dir(source)
    draft_config = EngineConfig(
        model=None if as_engine else source,
        engine_dir=source if as_engine else None,
        dtype=config.dtype,
        device=config.device,
    )
    return load_model(draft_config)


def check_draft(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft must speak the target's vocabulary: its token ids are fed to the target as they are."""
    if draft.device != target.device:
        raise ValueError(f"the draft model is on {draft.device} but the target on {target.device}.")
    same = draft.model.args.vocab_size == target.model.args.vocab_size
    if same and draft.tokenizer is not None and target.tokenizer is not None:
        same = draft.tokenizer.get_vocab() == target.tokenizer.get_vocab()
    if not same:
        raise ValueError(
            f"the draft model {draft.name} does not share the target's tokenizer "
            f"({draft.model.args.vocab_size} vs {target.model.args.vocab_size} tokens); a draft must use "
            "the same vocabulary."
        )
