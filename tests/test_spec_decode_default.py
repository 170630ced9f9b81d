"""On the real default model in float32: greedy output with speculative decoding (its INT4 build as the
draft, and n-gram lookup), alone and in a concurrent batch, equals greedy output without it."""

from __future__ import annotations

import pytest
import torch

from engines.base import GenerationRequest, SamplingParams
from engines.torch.loader import LoadedModel
from tests.conftest import greedy, run_to_completion

pytestmark = pytest.mark.slow

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def int4_draft(default_model) -> LoadedModel:
    """The default model's INT4 (RTN, g64) weights, quantized in memory: the draft `kiln build --draft-of`
    makes, minus the AWQ search."""
    from engines.build.quantize import quantize_model
    from engines.torch.models.llama import LlamaArgs, assemble, read_hf_checkpoint

    args = LlamaArgs.from_hf_config(default_model.hf_config)
    q = quantize_model(
        read_hf_checkpoint(default_model.folder, args, torch.float32, default_model.device),
        args,
        "int4-rtn",
        None,
        progress=False,
    )
    model = assemble(args, dict(q.tensors), q.formats, torch.float32, default_model.device)
    return LoadedModel(
        model,
        default_model.hf_config,
        default_model.tokenizer,
        "int4-draft",
        default_model.folder,
        torch.float32,
        default_model.device,
    )


def requests(prompts):
    return [GenerationRequest(str(i), p, greedy(MAX_TOKENS, ignore_eos=True)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def reference(default_model, chat_prompts):
    from engines.config import EngineConfig
    from engines.torch.loader import build_core

    core = build_core(EngineConfig(kv_cache_memory=256 << 20), default_model)
    out = {}
    for request in requests(chat_prompts):
        out.update(run_to_completion(core, [request]))
    return out


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_greedy_equals_plain_greedy(
    default_model, int4_draft, chat_prompts, reference, make_engine, method
):
    draft = int4_draft if method == "draft" else None
    settings = dict(kv_cache_memory=256 << 20, speculative_method=method, ngram_min=1)
    alone = make_engine(default_model, draft, **settings)
    got = {}
    for request in requests(chat_prompts):
        got.update(run_to_completion(alone, [request]))
    assert got == reference
    stats = alone.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens

    together = make_engine(default_model, draft, **settings)
    arrivals = {str(i): 2 * i for i in range(len(chat_prompts))}
    assert run_to_completion(together, requests(chat_prompts), arrivals) == reference


def test_a_draft_model_speculates_under_the_grammar(default_model, int4_draft, chat_prompts, make_engine):
    """The draft proposes from the grammar-masked distribution and the target verifies each position under the
    grammar state after the drafts before it: greedy output with a JSON schema equals the same without speculation."""
    import json

    from engines.base import StructuredOutput

    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 60},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    params = dict(temperature=0.0, max_tokens=60, structured=StructuredOutput("json", json.dumps(schema)))
    reqs = [GenerationRequest(str(i), p, SamplingParams(**params)) for i, p in enumerate(chat_prompts[:3])]
    plain = run_to_completion(make_engine(default_model, kv_cache_memory=256 << 20), reqs)
    spec = make_engine(default_model, int4_draft, kv_cache_memory=256 << 20, speculative_method="draft")
    reqs = [GenerationRequest(str(i), p, SamplingParams(**params)) for i, p in enumerate(chat_prompts[:3])]
    assert run_to_completion(spec, reqs) == plain
    assert spec.spec_accepted_tokens > 0
    for out in plain.values():
        json.loads(default_model.tokenizer.decode(out[0], skip_special_tokens=True))
