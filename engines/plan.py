"""Capacity planning: how much memory a model needs per precision, and whether it fits a GPU or CPU.

For each precision (bf16, fp8, int8, int4) the plan adds up, per GPU the model runs on,
- weights: parameters x bytes per parameter (int4 adds an fp16 scale and a 4-bit zero per group of 128),
  divided by the GPUs of the split (tensor x pipeline parallel, engines/parallel.py),
- KV cache: batch x max_model_len tokens x 2 (K and V) x layers x kv_heads x head_dim x bytes per
  element of the KV dtype that precision's profiles use (bf16 with bf16, fp8 with fp8, int8 otherwise),
  with the KV heads divided by the tensor-parallel size (at least one each) and the layers by the
  pipeline-parallel size,
- headroom: 10% of the two for activations, workspace and the runtime,
and compares the total with one GPU's memory (or this machine's). GPUs beyond the split hold nothing:
a model fits only if one rank's share does, and when it does not, the plan names the smallest
--tensor-parallel-size that fits the GPUs given. Sizes are in GB = 10^9 bytes, as model sizes are
usually quoted (a 70B model is ~140 GB in bf16).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engines import schemes
from engines.hardware import Hardware
from engines.parallel import ONE_GPU, GpuSplit
from engines.profiles import DEFAULT_GROUP_SIZE, Profile, load_profiles, pick, supported_on
from engines.torch.models.params import decoder_param_count

HEADROOM = 0.10
GB = 1e9
MiB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # what the driver reports as total
    sm: int
    aliases: tuple[str, ...] = ()


GPUS = (
    GpuSpec("H100", 81559 * MiB, 90, ("H100-80GB", "H100-SXM", "H100-PCIE")),
    GpuSpec("H200", 143771 * MiB, 90, ("H200-141GB",)),
    GpuSpec("A100-40GB", 40960 * MiB, 80, ("A100-40",)),
    GpuSpec("A100-80GB", 81920 * MiB, 80, ("A100-80",)),
    GpuSpec("L40S", 46068 * MiB, 89, ("L40S-48GB",)),
    GpuSpec("L4", 23034 * MiB, 89, ("L4-24GB",)),
    GpuSpec("A10G", 23028 * MiB, 86, ("A10G-24GB",)),
    GpuSpec("RTX-4090", 24564 * MiB, 89, ("4090", "RTX4090", "GeForce-RTX-4090")),
)

# KV dtype -> (name in the table, bytes per element); "model" is the bf16 the GPU engines run in
KV_SIZES = {"model": ("bf16", 2), "int8": ("int8", 1), "fp8": ("fp8", 1)}


class PlanError(ValueError):
    """Bad planning input: an unknown GPU, a config without the needed fields, a bad number."""


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def gpu_spec(name: str) -> GpuSpec:
    wanted = _normalize(name)
    for spec in GPUS:
        if wanted in {_normalize(spec.name), *map(_normalize, spec.aliases)}:
            return spec
    known = ", ".join(spec.name for spec in GPUS)
    raise PlanError(f"Unknown GPU {name!r}; known GPUs are {known}.")


def gpu_hardware(name: str, count: int = 1) -> Hardware:
    spec = gpu_spec(name)
    return Hardware(device="cuda", name=spec.name, memory_bytes=spec.memory_bytes, count=count, sm=spec.sm)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int | None = None

    def kv_bytes_per_token(self, bytes_per_element: float, split: GpuSplit = ONE_GPU) -> float:
        """K and V of one token on one GPU of `split`: its share of the layers and of the KV heads (a
        tensor-parallel size above the KV heads replicates them, one head per GPU)."""
        layers = math.ceil(self.layers / split.pipeline)
        kv_heads = math.ceil(self.kv_heads / split.tensor)
        return 2 * layers * kv_heads * self.head_dim * bytes_per_element


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """Parameter count and KV geometry of a decoder-only transformer from its Hugging Face config.json."""
    try:
        hidden = config["hidden_size"]
        layers = config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        intermediate = config["intermediate_size"]
        vocab = config["vocab_size"]
    except KeyError as exc:
        raise PlanError(
            f"The model's config.json has no {exc.args[0]!r}; plan it with --params, --layers, "
            "--kv-heads and --head-dim instead."
        ) from None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    # Qwen3-MoE's experts have their own size (its intermediate_size is a dense MLP's, unused when every layer is
    # sparse); Mixtral's intermediate_size is its experts'
    intermediate = config.get("moe_intermediate_size") or intermediate
    # Biases are counted where the config declares them (attention_bias); families whose biases are implicit
    # (Qwen2) are counted without them, a difference of a few parts per million.
    params = decoder_param_count(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=vocab,
        tied_embeddings=bool(config.get("tie_word_embeddings")),
        qkv_bias=bool(config.get("attention_bias")),
        experts=config.get("num_local_experts") or config.get("num_experts") or 1,
    )
    return ModelShape(name, float(params), layers, kv_heads, head_dim, config.get("max_position_embeddings"))


def load_shape(model: str | None) -> ModelShape:
    """The shape of a local model folder, a .gguf file, or (None) the embedded default model."""
    from engines.model_source import ModelNotFoundError, model_display_name, resolve_model

    if model is not None and not Path(model).expanduser().exists():
        raise PlanError(
            f"--model {model!r} is not a local model folder or .gguf file; to plan a model that is not "
            "downloaded, give --params, --layers, --kv-heads and --head-dim."
        )
    try:
        folder = resolve_model(model)
    except ModelNotFoundError as exc:
        raise PlanError(str(exc)) from None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"Cannot read {folder / 'config.json'}: {exc}.") from None
    config = config.get("text_config", config)  # multimodal configs nest the language model
    return shape_from_config(config, model_display_name(model))


def parse_count(text: str) -> float:
    """'70e9', '70B', '8b', '135M' or '7000000000' as a number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise PlanError(f"{text!r} is not a number such as 70e9, 70B or 135M.")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]


@dataclass(frozen=True)
class PlanRow:
    precision: str
    weight_bytes: float
    kv_dtype: str
    kv_bytes: float
    headroom_bytes: float
    total_bytes: float
    fits: bool


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    target: Hardware
    target_memory_bytes: float  # of one GPU (or this machine's RAM): what each rank's share must fit
    split: GpuSplit
    batch: int
    max_model_len: int
    rows: tuple[PlanRow, ...]
    recommended: Profile | None
    recommended_fits: bool
    profile_by_precision: dict[str, str]  # row precision -> the supported profile that builds it, if any
    # the smallest tensor-parallel size at which the recommended profile fits the GPUs given, when this split does not
    suggested_tensor_parallel: int | None = None


def make_plan(
    shape: ModelShape,
    target: Hardware,
    batch: int = 1,
    max_model_len: int | None = None,
    profiles: list[Profile] | None = None,
    split: GpuSplit = ONE_GPU,
) -> Plan:
    if batch < 1:
        raise PlanError(f"--batch must be at least 1, got {batch}.")
    max_model_len = max_model_len or shape.max_position_embeddings or 4096
    if max_model_len < 1:
        raise PlanError(f"--max-model-len must be at least 1, got {max_model_len}.")
    if split.world_size > target.count:
        raise PlanError(f"A split over {split.describe()} needs --gpus {split.world_size} or more.")
    memory = target.memory_bytes
    rows = _rows(shape, batch * max_model_len, split, memory)
    # the profile for the memory the split spans: tensor x pipeline GPUs, never GPUs nothing splits the model across
    recommended = pick(target, shape.params * 2, memory * split.world_size, profiles)
    recommended_scheme = schemes.get(recommended.precision)
    recommended_fits = _fits(shape, batch * max_model_len, split, memory, recommended_scheme)
    suggested = None
    if not recommended_fits:
        wider = (GpuSplit(t, split.pipeline) for t in _powers_of_two(split.tensor, target.count // split.pipeline))
        suggested = next(
            (s.tensor for s in wider if _fits(shape, batch * max_model_len, s, memory, recommended_scheme)), None
        )
    row_names = {r.precision for r in rows}
    profile_by_precision = {}
    for profile in load_profiles() if profiles is None else profiles:
        row_name = schemes.get(profile.precision).family
        if row_name in row_names and row_name not in profile_by_precision and supported_on(profile, target)[0]:
            profile_by_precision[row_name] = profile.name  # profiles come highest priority first
    return Plan(
        shape,
        target,
        memory,
        split,
        batch,
        max_model_len,
        tuple(rows),
        recommended,
        recommended_fits,
        profile_by_precision,
        suggested,
    )


def _rows(shape: ModelShape, tokens: int, split: GpuSplit, memory: float) -> list[PlanRow]:
    rows = []
    for scheme in schemes.schemes():  # one row per family, for the scheme that stands for it
        if not scheme.plan_row:
            continue
        kv_dtype, kv_bytes_per_element = KV_SIZES[scheme.default_kv]
        weights = shape.params * scheme.bytes_per_param(DEFAULT_GROUP_SIZE) / split.world_size
        kv = tokens * shape.kv_bytes_per_token(kv_bytes_per_element, split)
        headroom = HEADROOM * (weights + kv)
        total = weights + kv + headroom
        rows.append(PlanRow(scheme.family, weights, kv_dtype, kv, headroom, total, total <= memory))
    return rows


def _fits(shape: ModelShape, tokens: int, split: GpuSplit, memory: float, scheme) -> bool:
    row = next((r for r in _rows(shape, tokens, split, memory) if r.precision == scheme.family), None)
    if row is not None:
        return row.fits
    # a family without a row (fp32): its weights and headroom alone
    return shape.params * scheme.bytes_per_param(DEFAULT_GROUP_SIZE) / split.world_size * (1 + HEADROOM) <= memory


def _powers_of_two(above: int, most: int) -> list[int]:
    """Tensor-parallel sizes to try, above the current one: powers of two, which divide the usual head counts."""
    sizes, size = [], 1
    while size <= most:
        if size > above:
            sizes.append(size)
        size *= 2
    return sizes


def _gb(value: float) -> str:
    """Three significant digits: 141 GB, 35.9 GB, 1.23 GB, 270 MB."""
    if value < GB:
        return f"{value / 1e6:.3g} MB" if value >= 1e6 else f"{value / 1e6:.2f} MB"
    digits = 0 if value >= 100 * GB else 1 if value >= 10 * GB else 2
    return f"{value / GB:,.{digits}f} GB"


def format_plan(plan: Plan) -> str:
    shape, target = plan.shape, plan.target
    if target.device == "cuda":
        where = (
            f"{target.count} x {target.name} (SM {target.sm}, {_gb(target.memory_bytes)} each); the model split over "
            f"{plan.split.describe()}, sizes per GPU"
        )
    else:
        where = f"this machine's RAM, {_gb(plan.target_memory_bytes)} ({target.name})"
    lines = [
        f"Model:    {shape.name}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, "
        f"{shape.kv_heads} KV heads x {shape.head_dim} head dim",
        f"Target:   {where}",
        f"KV cache: batch {plan.batch} x {plan.max_model_len} tokens; headroom {HEADROOM:.0%} for activations "
        "and runtime; GB = 10^9 bytes",
        "",
    ]
    header = ("precision", "weights", "KV dtype", "KV cache", "headroom", "total", "fits", "profile here")
    table = [header] + [
        (
            r.precision,
            _gb(r.weight_bytes),
            r.kv_dtype,
            _gb(r.kv_bytes),
            _gb(r.headroom_bytes),
            _gb(r.total_bytes),
            "yes" if r.fits else "no",
            plan.profile_by_precision.get(r.precision, "- (not supported)"),
        )
        for r in plan.rows
    ]
    lines += format_table(table, right_align={1, 3, 4, 5})
    lines.append("")
    rec = plan.recommended
    verdict = ""
    if not plan.recommended_fits and plan.suggested_tensor_parallel:
        verdict = (
            f"; it does not fit on {plan.split.describe()}: build it with --backend trtllm "
            f"--tensor-parallel-size {plan.suggested_tensor_parallel}"
        )
    elif not plan.recommended_fits:
        verdict = "; it does not fit even so: add GPUs or shorten the context"
    lines.append(f"Recommended profile: {rec.name} ({rec.precision} weights, {rec.kv_cache_dtype} KV cache){verdict}")
    return "\n".join(lines)


def format_table(rows: list[tuple[str, ...]], right_align: set[int] = frozenset()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(w) if i in right_align else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out
