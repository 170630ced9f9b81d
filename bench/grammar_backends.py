"""xgrammar vs llguidance on this CPU: JSON-schema compile time and per-token mask cost, SmolLM2's tokenizer.

Over the schemas of tests/structured_schemas.py, for each library:
  compile      schema -> a new matcher, cold: xgrammar's compiler has its cache disabled (and uses every core),
               llguidance has no cache (and builds its lexer lazily, so part of its work moves into the first
               masks). "ready" adds the first mask fill: the delay a request's first token sees.
  mask         the schema's EXAMPLES instance as json.dumps (separators ", " and ": ", the compact form both
               are configured for) is tokenized and walked on a fresh matcher: each position times
               fill_next_token_bitmask into a preallocated bitmask, then accepts the token; the walk ends by
               filling the mask that must allow only EOS and accepting EOS. Percentiles are over every position.
  apply        applying a [32, 49152] bitmask to float32 logits in place (xgrammar's CPU kernel; llguidance's
               torch.compile'd kernel, whose one-off compile is reported separately).
  batch of 32  32 matchers mid-walk, one mask each into a [32, 49152] bitmask: 32 sequential fills vs
               xgrammar's BatchGrammarMatcher and llguidance's LLExecutor, both given every core.

    python -m bench.grammar_backends
Prints a Markdown table and writes JSON and PNG (CDFs of compile time and of per-token mask time) to bench/results/.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# torch.compile (llguidance's apply kernel) would otherwise start a pool of compile worker processes that keep
# this small machine's cores busy for seconds afterwards and skew every timing taken meanwhile.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

from bench.event_loop import RESULTS, cpu_model
from tests.structured_schemas import EXAMPLES, SCHEMAS

VOCAB = 49152
BATCH = 32
APPLY_REPS = 200
BATCH_STEPS = 20  # lockstep positions at which the 32-row fills are timed
LLG_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def load_tokenizer():
    """kiln's default model tokenizer, from the folder kiln converts its embedded GGUF into."""
    from transformers import AutoTokenizer

    from engines.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))


def now_us() -> float:
    return time.perf_counter_ns() / 1000


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xg

        self.xg = xg
        self.eos = tok.eos_token_id
        # from_huggingface leaves SmolLM2's added special tokens (<|im_start|>, ...) as plain text that a JSON
        # string may contain; excluding them changes which bits are set, not what a mask costs.
        info = xg.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=[self.eos])
        self.compiler = xg.GrammarCompiler(info, max_threads=os.cpu_count(), cache_enabled=False)
        self.bitmask = xg.allocate_token_bitmask(BATCH, VOCAB)

    def start(self, schema: dict):
        return self.xg.GrammarMatcher(self.compiler.compile_json_schema(schema, any_whitespace=False))

    def fill(self, matcher, row: int = 0) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def finished(self, matcher) -> bool:
        return matcher.is_terminated()

    def apply(self, logits: torch.Tensor) -> None:
        self.xg.apply_token_bitmask_inplace(logits, self.bitmask)

    def batch_filler(self):
        batch = self.xg.BatchGrammarMatcher(max_threads=os.cpu_count())
        return lambda matchers: batch.batch_fill_next_token_bitmask(matchers, self.bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.eos = tok.eos_token_id
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
        self.bitmask = llguidance.torch.allocate_token_bitmask(BATCH, VOCAB)

    def start(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=LLG_JSON_OPTIONS)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():  # llguidance reports grammar errors this way rather than raising
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher, row: int = 0) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, self.bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def finished(self, matcher) -> bool:
        return matcher.is_stopped() and not matcher.is_error()

    def apply(self, logits: torch.Tensor) -> None:
        self.llg.torch.apply_token_bitmask_inplace(logits, self.bitmask)

    def batch_filler(self):
        executor = self.llg.LLExecutor(num_threads=os.cpu_count())
        return lambda matchers: self.llg.torch.fill_next_token_bitmask_par(
            executor, [(m, row) for row, m in enumerate(matchers)], self.bitmask
        )


def walk(lib, schema: dict, tokens: list[int]) -> tuple[float, list[float]]:
    """Cold start (µs) and the mask fill time (µs) at every position of `tokens`, then EOS."""
    t0 = now_us()
    matcher = lib.start(schema)
    start_us = now_us() - t0
    fills = []
    for token in [*tokens, lib.eos]:
        t0 = now_us()
        lib.fill(matcher)
        fills.append(now_us() - t0)
        if not lib.accept(matcher, token):
            raise RuntimeError(f"{lib.name} rejected token {token} at position {len(fills) - 1}")
    if not lib.finished(matcher):
        raise RuntimeError(f"{lib.name} did not terminate after EOS")
    return start_us, fills


def time_batch(lib, picks: list[tuple[dict, list[int]]], steps: int) -> dict:
    """32 matchers walked in lockstep; at each position the 32 masks are filled one by one and in one batch
    call (which goes first alternates, since a library may cache what the first fill computed), and the two
    bitmasks must agree."""
    matchers = [lib.start(schema) for schema, _ in picks]
    fill_batch = lib.batch_filler()
    sequential, batched = [], []
    masks: dict[int, torch.Tensor] = {}  # this step's bitmask from each run: 0 one row at a time, 1 batched
    for step in range(steps):
        for run in (0, 1) if step % 2 == 0 else (1, 0):
            t0 = now_us()
            if run == 0:
                for row, matcher in enumerate(matchers):
                    lib.fill(matcher, row)
            else:
                fill_batch(matchers)
            (sequential if run == 0 else batched).append(now_us() - t0)
            masks[run] = lib.bitmask.clone()
        if not torch.equal(masks[0], masks[1]):
            raise RuntimeError(f"{lib.name}: batched masks differ from sequential ones at position {step}")
        for matcher, (_, tokens) in zip(matchers, picks):
            lib.accept(matcher, tokens[step])
    return {"sequential_us": sequential, "batched_us": batched}


def time_apply(lib) -> tuple[float, list[float]]:
    """The first call (llguidance's torch.compile happens there) and APPLY_REPS more, in µs."""
    logits = torch.randn(BATCH, VOCAB)
    times = []
    for _ in range(APPLY_REPS + 1):
        t0 = now_us()
        lib.apply(logits)
        times.append(now_us() - t0)
    return times[0], times[1:]


def stats(values: list[float]) -> dict:
    a = np.asarray(values)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "total": float(a.sum()),
    }


def table(summary: dict) -> str:
    libs = list(summary)
    rows = [
        ("compile ms, median", lambda s: s["compile_ms"]["median"]),
        ("compile ms, p90", lambda s: s["compile_ms"]["p90"]),
        ("compile ms, max", lambda s: s["compile_ms"]["max"]),
        ("compile ms, total", lambda s: s["compile_ms"]["total"]),
        ("ready (compile + first mask) ms, median", lambda s: s["ready_ms"]["median"]),
        ("ready ms, max", lambda s: s["ready_ms"]["max"]),
        ("mask µs/token, median", lambda s: s["mask_us"]["median"]),
        ("mask µs/token, p90", lambda s: s["mask_us"]["p90"]),
        ("mask µs/token, p99", lambda s: s["mask_us"]["p99"]),
        ("mask µs/token, max", lambda s: s["mask_us"]["max"]),
        (f"apply [{BATCH}, {VOCAB}] µs, median", lambda s: s["apply_us"]["median"]),
        ("apply first call ms", lambda s: s["apply_first_ms"]),
        (f"{BATCH} masks one by one µs, median", lambda s: s["batch"]["sequential_us"]["median"]),
        (f"{BATCH} masks in one batch call µs, median", lambda s: s["batch"]["batched_us"]["median"]),
    ]
    lines = ["| | " + " | ".join(libs) + " |", "|---|" + "---:|" * len(libs)]
    lines += [f"| {label} | " + " | ".join(f"{get(summary[lib]):,.1f}" for lib in libs) + " |" for label, get in rows]
    return "\n".join(lines)


def plot(per_schema: dict, masks: dict, path: Path) -> None:
    """CDFs: left compile time per schema, right mask time per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for lib in per_schema:
        for ax, values in ((left, [r["compile_ms"] for r in per_schema[lib]]), (right, masks[lib])):
            ax.plot(np.sort(values), np.linspace(0, 1, len(values)), label=lib)
    left.set(
        xlabel="compile ms (log)",
        ylabel="fraction of schemas",
        xscale="log",
        title=f"Cold compile, {len(per_schema[lib])} JSON schemas",
    )
    right.set(
        xlabel="fill_next_token_bitmask µs (log)",
        ylabel="fraction of positions",
        xscale="log",
        title=f"Mask per token, {len(masks[lib])} positions",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    from importlib.metadata import version

    print(f"# grammar backends: {len(SCHEMAS)} schemas, vocab {VOCAB}, CPU {cpu_model()}", flush=True)
    tok = load_tokenizer()
    sequences = {name: tok.encode(json.dumps(EXAMPLES[name]), add_special_tokens=False) for name, _ in SCHEMAS}
    libs = [XGrammar(tok), LLGuidance(tok)]
    warmup_schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for lib in libs:  # one-off initialisation stays out of the first schema's numbers
        walk(lib, warmup_schema, tok.encode('{"ok": true}', add_special_tokens=False))

    per_schema = {lib.name: [] for lib in libs}
    masks = {lib.name: [] for lib in libs}
    for k, (name, schema) in enumerate(SCHEMAS):
        for lib in libs:  # interleaved, so that both libraries see the same background load
            start_us, fills = walk(lib, schema, sequences[name])
            per_schema[lib.name].append(
                {
                    "schema": name,
                    "tokens": len(fills),
                    "compile_ms": start_us / 1000,
                    "first_mask_us": fills[0],
                    "mask_median_us": float(np.median(fills)),
                    "mask_max_us": max(fills),
                }
            )
            masks[lib.name] += fills
        print(
            f"  [{k + 1}/{len(SCHEMAS)}] {name}: {len(sequences[name])} tokens, compile ms "
            + ", ".join(f"{lib}: {rows[-1]['compile_ms']:.1f}" for lib, rows in per_schema.items()),
            flush=True,
        )

    longest = sorted(SCHEMAS, key=lambda item: len(sequences[item[0]]), reverse=True)[:BATCH]
    picks = [(schema, sequences[name]) for name, schema in longest]
    steps = min(BATCH_STEPS, min(len(tokens) for _, tokens in picks))
    summary = {}
    for lib in libs:
        print(f"  {lib.name}: {BATCH} masks per step over {steps} steps, then apply", flush=True)
        batch = time_batch(lib, picks, steps)
        apply_first, apply_times = time_apply(lib)
        rows = per_schema[lib.name]
        summary[lib.name] = {
            "version": version(lib.name),
            "compile_ms": stats([r["compile_ms"] for r in rows]),
            "ready_ms": stats([r["compile_ms"] + r["first_mask_us"] / 1000 for r in rows]),
            "mask_us": stats(masks[lib.name]),
            "apply_us": stats(apply_times),
            "apply_first_ms": apply_first / 1000,
            "batch": {key: stats(values) for key, values in batch.items()},
        }

    print(
        f"\nCPU {cpu_model()}; {len(SCHEMAS)} schemas, {len(masks[libs[0].name])} mask positions per library; "
        + ", ".join(f"{lib} {s['version']}" for lib, s in summary.items())
        + "\n"
    )
    print(table(summary))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "vocab": VOCAB,
        "batch": BATCH,
        "batch_steps": steps,
        "threads": os.cpu_count(),
        "summary": summary,
        "per_schema": per_schema,
    }
    out = RESULTS / f"grammar_backends-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(per_schema, masks, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
