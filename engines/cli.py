"""`kiln build`, `kiln plan` and `kiln profiles`: the commands that need only the engines (no HTTP server).

`server/cli.py` (the `kiln` entry point) adds them next to `kiln serve`; they live here so that building and
planning never import the server. Bad input ends with one readable sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class UsageParser(argparse.ArgumentParser):
    """argparse with one line instead of its usage dump on bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`).\n")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add build, profiles and plan to the `kiln` parser's subcommands."""
    _add_build(subparsers)
    _add_profiles(subparsers)
    _add_plan(subparsers)


def _add_build(subparsers: argparse._SubParsersAction) -> None:
    from engines import schemes
    from engines.calibration import DEFAULT_SAMPLES, MAX_SAMPLES, MIN_SAMPLES

    build = subparsers.add_parser(
        "build",
        help="compile a model into an engine directory (quantized weights, KV-cache dtype, build report)",
        description="Calibrate, quantize and evaluate a model for this machine and write an engine directory that "
        "`kiln serve --engine-dir` loads. Re-running with the same inputs reuses the engine.",
    )
    add = build.add_argument
    add("--model", help="Hugging Face model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    add("--output", required=True, help="engine directory to write (created; replaced when it holds an older engine)")
    trtllm_only = [s.name for s in schemes.schemes() if not s.torch_build]
    add(
        "--precision",
        default="auto",
        help=f"auto or one of {', '.join(schemes.torch_names())}, or "
        f"{' or '.join(trtllm_only)} with --backend trtllm "
        "(default: auto, the profile `kiln profiles` names for this machine)",
    )
    add("--kv-cache-dtype", default="auto", help="auto (the profile's), model, int8 or fp8 (default: auto)")
    add(
        "--calib",
        help='JSONL of chat requests ({"messages": [...]} per line) to calibrate with (default: kiln\'s '
        "calibration set)",
    )
    add(
        "--calib-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"calibration requests to use, {MIN_SAMPLES}..{MAX_SAMPLES} (default: {DEFAULT_SAMPLES})",
    )
    add(
        "--calibrator",
        default="minmax",
        help="range calibrator for static scales (the KV cache): minmax, percentile "
        "(99.99) or entropy (default: minmax)",
    )
    add(
        "--group-size",
        type=int,
        default=128,
        help="int4 group size; halved for inputs it does not divide (default: 128)",
    )
    add("--backend", default="torch", help="torch or trtllm (default: torch)")
    add(
        "--max-accuracy-loss",
        type=float,
        help="with --precision auto: build the most aggressive profile whose mean "
        "KL divergence on the held-out set stays within this budget (e.g. 0.05)",
    )
    add("--eval-samples", type=int, default=128, help="held-out prompts the accuracy is measured on (default: 128)")
    add("--eval-tokens", type=int, default=32, help="answer tokens per held-out prompt (default: 32)")
    add(
        "--bench",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure decode tok/s at concurrency 1 and 32 for the report (default: on)",
    )
    add(
        "--gather-logits",
        action="store_true",
        help="--backend trtllm: build with gather_generation_logits, which TensorRT-LLM needs to return logprobs; "
        "serving it then keeps the last 8 steps' logits of every batch slot on the GPU (2 x 8 x max batch 64 x vocab "
        "x 4 bytes: 200 MB for a 49k vocabulary, 525 MB for 128k) and each logprobs request's logits in pinned host "
        "memory (max_tokens x vocab x 4 bytes) (default: off: the engine refuses logprobs)",
    )
    add("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add("--force", action="store_true", help="rebuild even when the engine in --output is up to date")
    add(
        "--draft-of",
        metavar="ENGINE_DIR",
        help="build a speculative-decoding draft for this engine: its model "
        "(unless --model) at int4-awq (unless --precision); serve with `kiln serve --engine-dir ENGINE_DIR "
        "--speculative-draft OUTPUT`",
    )
    add(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="--backend trtllm: split every layer across this many GPUs (TensorRT-LLM tensor parallelism; default: 1)",
    )
    add(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="--backend trtllm: split the layers into this many consecutive stages, one GPU each (default: 1)",
    )
    _defaults_from_environment(build, BUILD_ENV_FLAGS)
    build.set_defaults(handler=build_command)


# The build flags that read KILN_<FLAG> when not given, as `kiln serve`'s do, so that one .env (compose)
# configures both. --output, --force and --draft-of name one particular build and stay flags; KILN_BACKEND
# is serve's (it also takes auto) and is not read here.
BUILD_ENV_FLAGS = (
    "model",
    "precision",
    "kv_cache_dtype",
    "calib",
    "calib_samples",
    "calibrator",
    "group_size",
    "max_accuracy_loss",
    "eval_samples",
    "eval_tokens",
    "device",
    "tensor_parallel_size",
    "pipeline_parallel_size",
)


def _defaults_from_environment(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> None:
    """KILN_<DEST> becomes the flag's default; argparse converts it like a command-line value, so a bad one
    gets the flag's usual one-line error."""
    for action in parser._actions:
        if action.dest not in dests:
            continue
        variable = f"KILN_{action.dest.upper()}"
        action.help = f"{action.help} [env {variable}]"
        if os.environ.get(variable):
            action.default = os.environ[variable]


def build_command(args: argparse.Namespace) -> int:
    from engines.build.builder import BuildError, BuildOptions, build
    from engines.calibration import CalibrationDataError
    from engines.model_source import ModelNotFoundError
    from engines.profiles import ProfileError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = BuildOptions(**{key: value for key, value in vars(args).items() if key != "handler"})
    try:
        result = build(options)
    except (BuildError, CalibrationDataError, ModelNotFoundError, ProfileError) as exc:
        print(f"kiln build: {exc}", file=sys.stderr)
        return EXIT_USAGE
    m = result.manifest
    verb = "is up to date" if result.reused else "was built"
    serve = f"kiln serve --engine-dir {result.output}"
    if options.draft_of:
        serve = f"kiln serve --engine-dir {options.draft_of} --speculative-draft {result.output}"
    print(
        f"Engine {result.output} {verb}: {m.precision} weights, {m.kv_cache_dtype} KV cache, for "
        f"{m.target.description}. Serve it with `{serve}`; the report is in "
        f"{result.output / 'build-report.md'}."
    )
    return 0


def _add_profiles(subparsers: argparse._SubParsersAction) -> None:
    profiles = subparsers.add_parser(
        "profiles",
        help="list the build profiles and which this machine supports",
        description="List the build profiles in build/profiles, whether this machine supports each, and the one "
        "`--precision auto` picks here.",
    )
    profiles.set_defaults(handler=profiles_command)


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="estimate the memory a model needs per precision and whether it fits",
        description="Estimate weights, KV cache and headroom per precision (bf16, fp8, int8, int4) for a model, "
        "say whether it fits the named GPUs (or this machine) and which profile to build. A model that is not "
        "downloaded can be planned from --params, --layers, --kv-heads and --head-dim.",
    )
    add = plan.add_argument
    add("--model", help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    add(
        "--gpu",
        help="plan for this GPU, e.g. H100, H200, A100-40GB, A100-80GB, L40S, L4, A10G, RTX-4090 "
        "(default: this machine)",
    )
    add(
        "--gpus",
        type=int,
        default=1,
        help="number of such GPUs; the model uses those its split names (default: 1)",
    )
    add(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="plan a TensorRT-LLM engine whose layers are split across this many GPUs (default: 1)",
    )
    add(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="plan a TensorRT-LLM engine whose layers run in this many stages, one GPU each (default: 1)",
    )
    add("--max-model-len", type=int, help="context length per sequence (default: the model's)")
    add("--batch", type=int, default=1, help="sequences held in the KV cache at once (default: 1)")
    add("--params", help="parameter count, e.g. 70e9 or 70B (overrides the config)")
    add("--layers", type=int, help="transformer layers (overrides the config)")
    add("--kv-heads", type=int, help="key/value heads (overrides the config)")
    add("--head-dim", type=int, help="dimension of one attention head (overrides the config)")
    plan.set_defaults(handler=plan_command)


def profiles_command(args: argparse.Namespace) -> int:
    from engines.hardware import detect
    from engines.plan import format_table
    from engines.profiles import ProfileError, load_profiles, pick, supported_on

    try:
        profiles = load_profiles()
    except ProfileError as exc:
        print(f"kiln profiles: {exc}", file=sys.stderr)
        return EXIT_USAGE
    hardware = detect()
    rows = [("name", "precision", "KV cache", "backend", "requires", "this machine")]
    for profile in sorted(profiles, key=lambda p: (p.requires.device != "cuda", -p.priority, p.name)):
        ok, reason = supported_on(profile, hardware)
        rows.append(
            (
                profile.name,
                profile.precision,
                profile.kv_cache_dtype,
                ",".join(profile.backend),
                profile.requires_text(),
                "yes" if ok else f"no: {reason}",
            )
        )
    print(f"This machine: {hardware.describe()}\n")
    print("\n".join(format_table(rows)))
    try:
        auto = pick(hardware, 0, hardware.total_memory_bytes, profiles)
    except ProfileError as exc:
        print(f"\n--precision auto: {exc}")
        return 0
    print(
        f"\n--precision auto picks {auto.name} here ({auto.description}); `kiln plan` shows the choice for a "
        "given model, which can differ when the model is large for this machine's memory."
    )
    return 0


def plan_command(args: argparse.Namespace) -> int:
    import dataclasses

    from engines.hardware import detect
    from engines.parallel import GpuSplit, SplitError
    from engines.plan import ModelShape, PlanError, format_plan, gpu_hardware, load_shape, make_plan, parse_count
    from engines.profiles import ProfileError

    overrides = {"params": args.params, "layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    try:
        for flag in ("gpus", "layers", "kv_heads", "head_dim", "max_model_len", "batch"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise PlanError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
        if args.gpus != 1 and args.gpu is None:
            raise PlanError("--gpus needs --gpu to say which GPU.")
        if overrides["params"] is not None:
            overrides["params"] = parse_count(overrides["params"])
        target = gpu_hardware(args.gpu, args.gpus) if args.gpu is not None else detect()
        given = {key: value for key, value in overrides.items() if value is not None}
        model_is_local = args.model is not None and Path(args.model).expanduser().exists()
        if len(given) == len(overrides) and not model_is_local:
            shape = ModelShape(name=args.model or "custom", **given)
        else:
            shape = dataclasses.replace(load_shape(args.model), **given)
        split = GpuSplit(args.tensor_parallel_size, args.pipeline_parallel_size)
        plan = make_plan(shape, target, batch=args.batch, max_model_len=args.max_model_len, split=split)
    except (PlanError, ProfileError, SplitError) as exc:
        print(f"kiln plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_plan(plan))
    return 0
