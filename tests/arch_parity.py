"""What every architecture's parity tests share: the prompts (a shared prefix for a prefix-cache hit, prompts longer
than the step budget for chunked prefill), transformers' greedy tokens for them, the greedy-alone-and-batched check,
the speculative-decoding check, and the quantization topology's fold check. The `reference` fixture is registered
in tests/conftest.py."""

from __future__ import annotations

import torch

from engines.base import GenerationRequest
from engines.build.quantize import LayerWeights
from engines.torch.llm_engine import LLMEngine
from engines.torch.loader import LoadedModel
from engines.torch.sequence_runner import SequenceRunner
from tests.conftest import greedy, run_to_completion
from tests.test_engine_hf_parity import hf_greedy

NEW_TOKENS = 32
SHARED = 24  # tokens of prompt 0 that prompt 1 repeats: six full blocks of 4, a prefix-cache hit
BUDGET = 16  # max_num_batched_tokens: prompts 0, 1 and 3 are longer, so they are prefilled in chunks


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)

    def rand(n: int) -> list[int]:
        return torch.randint(3, 512, (n,), generator=gen).tolist()

    shared = rand(SHARED)
    return [shared + rand(5), shared + rand(9), rand(3), rand(70)]


def reference_tokens(hf_model) -> list[list[int]]:
    """transformers' greedy tokens for every prompt."""
    return [hf_greedy(hf_model, p, NEW_TOKENS, eos=False) for p in prompts()]


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(str(i), p, greedy(NEW_TOKENS, ignore_eos=True)) for i, p in enumerate(prompts())]


def check_greedy_alone_and_batched(
    make_engine, loaded: LoadedModel, expected: list[list[int]], unfused: bool = False
) -> None:
    """Each prompt alone, then all four in a batch with a prefix-cache hit and chunked prefills, equal `expected`;
    `unfused`: the engine must run the torch RoPE path (not rope_kv's fused one)."""
    alone = make_engine(loaded, block_size=4, enable_prefix_caching=False)
    if unfused:
        assert not alone.runner.attention.fused_rope
    for i, request in enumerate(requests()):
        assert run_to_completion(alone, [request])[str(i)][0] == expected[i], f"prompt {i} alone diverged"

    batched = make_engine(loaded, block_size=4, enable_prefix_caching=True, max_num_batched_tokens=BUDGET)
    # prompt 1 arrives once prompt 0's prefill has filled the cache; the others join a batch already running
    got = run_to_completion(batched, requests(), arrivals={"0": 0, "3": 1, "2": 2, "1": 8})
    for i in range(len(expected)):
        assert got[str(i)][0] == expected[i], f"prompt {i} in the batch diverged"
    assert batched.stats().prefix_cache_hits == SHARED


def speculative_engine(make_engine, loaded: LoadedModel, setup: str, other: LoadedModel | None = None) -> LLMEngine:
    """setup "draft-same": the target drafts for itself (every draft accepted); "draft-other": `other` drafts
    (drafts rejected and rolled back); "ngram": n-gram lookup."""
    if setup == "ngram":
        return make_engine(loaded, block_size=4, speculative_method="ngram", ngram_min=1, ngram_max=3)
    draft = loaded if setup == "draft-same" else other
    assert draft is not None, "draft-other needs the other model"
    return make_engine(loaded, draft, block_size=4, speculative_method="draft")


def check_speculative_output(core: LLMEngine, expected: list[list[int]]) -> None:
    """Requests arriving while others verify drafts still get the greedy tokens; drafts were proposed."""
    got = run_to_completion(core, requests(), arrivals={"0": 0, "1": 0, "2": 3, "3": 5})
    assert [got[str(i)][0] for i in range(len(expected))] == expected
    assert core.stats().spec_draft_tokens > 0


# ---- the quantization topology: every fold it allows leaves the float model's output unchanged ----


def folded(arch, tensors: dict[str, torch.Tensor], args, fold) -> dict[str, torch.Tensor]:
    """tensors with a random per-channel scale folded into every input `fold(inp)` selects, as the build folds."""
    gen = torch.Generator().manual_seed(5)
    out = dict(tensors)
    for i in range(args.num_layers):
        layer = LayerWeights(out, i, args, arch)
        for inp in layer.inputs:
            if fold(inp):
                k = layer.weights[inp.consumers[0]].shape[1]
                layer.scale_input(inp, torch.rand(k, generator=gen) * 3 + 0.25)
        out |= {layer.name(kind) + ".weight": w for kind, w in layer.weights.items()}
        out |= {layer.prefix + norm + ".weight": w for norm, w in layer.norms.items()}
        out |= {layer.name(kind) + ".bias": b for kind, b in layer.biases.items() if b is not None}
    return out


def float_logits(arch, args, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 model assembled from `tensors`: its logits over the first 40 tokens of the long prompt."""
    cpu = torch.device("cpu")
    model = arch.assemble(args, dict(tensors), {}, torch.float32, cpu)
    return SequenceRunner(model, torch.float32, cpu, 64).logits(prompts()[3][:40])


def changed_kinds(tensors: dict[str, torch.Tensor], folded_tensors: dict[str, torch.Tensor]) -> set[str]:
    """The weight kinds (qkv_proj, input_norm...) a fold changed in some layer."""
    return {n.split(".")[2] for n in tensors if not torch.equal(tensors[n], folded_tensors[n])}
