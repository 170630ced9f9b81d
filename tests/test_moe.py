"""Mixtral and Qwen3-MoE (sparse mixtures of experts) in the torch engine: greedy float32 output equals
transformers' token for token, alone and in a concurrent batch with a prefix-cache hit and chunked prompts
(tests/arch_parity.py's prompts and checks), and under speculative decoding; routing ties break as
transformers' do; the router spreads the test prompts over every expert; each expert's calibration statistics
come from the tokens routed to it only; the quantization topology's folds are exact; int8-wo at load time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engines.build.calibrate import Needs, calibrate_layer
from engines.build.quantize import LayerWeights
from engines.build.stream import LayerRunner, embed
from engines.torch.layers.linear import DenseLinear, LinearDispatch
from engines.torch.models import moe
from engines.torch.models.registry import ARCHITECTURES, architecture
from engines.torch.sequence_runner import SequenceRunner
from tests.arch_parity import (
    check_greedy_alone_and_batched,
    check_speculative_output,
    float_logits,
    folded,
    prompts,
    speculative_engine,
)

MODELS = ["mixtral-moe", "qwen3-moe"]
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_transformers_alone_and_batched(name, tiny_models, reference, make_engine):
    check_greedy_alone_and_batched(make_engine, tiny_models(name)[0], reference(name))


# one method per model, to keep the file short: a draft model (every draft accepted), n-gram lookup (drafts rejected
# and rolled back)
@pytest.mark.parametrize(("name", "setup"), [("mixtral-moe", "draft-same"), ("qwen3-moe", "ngram")])
def test_speculative_decoding_keeps_the_greedy_output(name, setup, tiny_models, reference, make_engine):
    """Verification steps route several tokens per sequence through the experts at once."""
    check_speculative_output(speculative_engine(make_engine, tiny_models(name)[0], setup), reference(name))


@pytest.mark.parametrize("name", MODELS)
def test_router_spreads_the_prompts_over_every_expert(name, tiny_models):
    """The parity above runs every expert of every layer (else a wrong expert could hide), and no token's
    renormalised top-k weights sum to other than one."""
    model = tiny_models(name)[0].model
    chosen: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def recording(original):
        def mlp(layer, h):
            weights, experts = moe.route(torch.nn.functional.linear(h, layer.router), model.args)
            chosen[list(model.layers).index(layer)].append(experts.flatten())
            if model.args.normalize_top_k:
                torch.testing.assert_close(weights.sum(-1), torch.ones(h.shape[0]))
            return original(layer, h)

        return mlp

    model.mlp = recording(model.mlp)
    try:
        runner = SequenceRunner(model, torch.float32, CPU, 128)
        for p in prompts():
            runner.hidden(p)
    finally:
        del model.mlp
    for layer_chosen in chosen:
        counts = torch.bincount(torch.cat(layer_chosen), minlength=model.args.num_experts)
        assert (counts > 0).all(), f"experts chosen: {counts.tolist()}"


def _hf_block_and_kiln_layer(name: str, tiny_models, tied_router: torch.Tensor):
    """transformers' MoE block of the tiny model's layer 0 and a kiln layer of the same weights, both with
    `tied_router` as their router."""
    hf = tiny_models(name)[1]
    block = hf.model.layers[0].mlp
    args = tiny_models(name)[0].model.args
    dispatch = LinearDispatch(torch.float32, CPU)
    layer = nn.Module()
    layer.router = tied_router
    for e, (gate_up, down) in enumerate(moe.expert_projections(args.num_experts)):
        setattr(layer, gate_up, DenseLinear(block.experts.gate_up_proj[e].detach().clone(), None, dispatch))
        setattr(layer, down, DenseLinear(block.experts.down_proj[e].detach().clone(), None, dispatch))
    return block, layer, args


@pytest.mark.parametrize("name", MODELS)
def test_routing_ties_break_as_transformers_does(name, tiny_models):
    """A router with equal rows gives equal probabilities: which of the tied experts is chosen, and so every
    output, must be transformers' (torch.topk on the same float32 probabilities)."""
    args = tiny_models(name)[0].model.args
    gen = torch.Generator().manual_seed(3)
    router = torch.randn(args.num_experts, args.hidden_size, generator=gen) * 0.2
    router[1] = router[2] = router[3] = router[0]  # experts 0-3 tie for every token
    router[0] *= 1.5  # ... and then 1-3 tie below or above expert 0, whose logit differs
    block, layer, args = _hf_block_and_kiln_layer(name, tiny_models, router)
    h = torch.randn(40, args.hidden_size, generator=gen)
    with torch.no_grad():
        saved = block.gate.weight.detach().clone()
        block.gate.weight.copy_(router)
        try:
            _, hf_weights, hf_experts = block.gate(h)
            expected = block(h.unsqueeze(0))[0]
        finally:
            block.gate.weight.copy_(saved)
    weights, experts = moe.route(torch.nn.functional.linear(h, layer.router), args)
    # the ties decide: some token chose one of experts 1-3 but not all of them
    tied_choices = [set(row) & {1, 2, 3} for row in experts.tolist()]
    assert any(0 < len(c) < 3 for c in tied_choices)
    assert torch.equal(experts, hf_experts) and torch.equal(weights, hf_weights)
    got = moe.moe_mlp(h, layer, moe.expert_projections(args.num_experts), args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # kiln's matmuls, not F.linear: a few ulps


@pytest.mark.parametrize("name", MODELS)
def test_each_expert_calibrates_on_its_routed_tokens_only(name, tiny_models):
    model = tiny_models(name)[0].model
    args = model.args
    ids = prompts()[3]
    runner = LayerRunner(model, torch.float32, CPU, len(ids))
    calib = calibrate_layer(runner, 0, embed(model, [ids], CPU), Needs(samples=True))
    assert calib.projections["layers.0.qkv_proj"].tokens == len(ids)  # every token reaches the attention
    counts = [calib.projections[f"layers.0.expert{e}_gate_up_proj"].tokens for e in range(args.num_experts)]
    assert sum(counts) == args.experts_per_token * len(ids) and all(0 < n < len(ids) for n in counts)
    for e in range(args.num_experts):
        stats = calib.projections[f"layers.0.expert{e}_down_proj"]
        assert stats.tokens == counts[e] and stats.sample_matrix().shape == (counts[e], args.intermediate_size)


@pytest.mark.parametrize("name", MODELS)
def test_param_count_is_the_checkpoint_s(name, tiny_models):
    loaded, hf = tiny_models(name)
    args = loaded.model.args
    total = sum(p.numel() for p in hf.parameters())
    assert architecture(args.model_type).param_count(args) == total
    inactive = args.num_layers * (args.num_experts - args.experts_per_token) * 3 * 64 * args.intermediate_size
    assert moe.active_param_count(args) == total - inactive


@pytest.mark.parametrize("name", MODELS)
def test_topology_folds_are_exact(name, tiny_models):
    """input_norm into qkv and each expert's down_proj into its own `up` rows fold exactly; no expert's gate_up is
    folded (the experts share the norm before them but not their statistics)."""
    loaded = tiny_models(name)[0]
    args = loaded.model.args
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, CPU)
    folds = folded(arch, tensors, args, lambda inp: inp.foldable)
    changed = {n.split(".")[2] for n in tensors if not torch.equal(tensors[n], folds[n])}
    experts = {kind for pair in moe.expert_projections(args.num_experts) for kind in pair}
    assert changed == {"input_norm", "qkv_proj"} | experts  # gate_up: only its `up` rows (down's fold)
    unfolded = [i.consumers[0] for i in LayerWeights(tensors, 0, args, arch).inputs if not i.foldable]
    assert unfolded == ["o_proj", *(gate_up for gate_up, _ in moe.expert_projections(args.num_experts))]
    torch.testing.assert_close(float_logits(arch, args, folds), float_logits(arch, args, tensors), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_int8_at_load_quantizes_the_experts_and_keeps_the_router_float(name, tiny_models):
    from engines.torch.load_quantization import load_quantized

    loaded = tiny_models(name)[0]
    model = load_quantized(loaded.folder, loaded.hf_config, "int8-wo", torch.float32, CPU)
    layer = model.layers[0]
    kinds = {type(getattr(layer, kind)).__name__ for kind in model.projections}
    assert kinds == {"Int8WeightOnlyLinear"} and len(model.projections) == 2 + 2 * model.args.num_experts
    # the router is kept as the norms are: in the dense dtype int8-wo stores (bf16), not quantized
    assert torch.equal(layer.router, loaded.model.layers[0].router.bfloat16().float())
    ids = prompts()[3]
    expected = SequenceRunner(loaded.model, torch.float32, CPU, 128).logits(ids).log_softmax(-1)
    got = SequenceRunner(model, torch.float32, CPU, 128).logits(ids).log_softmax(-1)
    kl = (expected.exp() * (expected - got)).sum(-1).mean().item()
    assert 0 < kl < 0.05


def test_registry_and_dense_layers_refused():
    from transformers import Qwen3MoeConfig

    assert ARCHITECTURES["mixtral"].model_class is moe.SparseMoeForCausalLM
    assert ARCHITECTURES["qwen3_moe"].model_class is moe.Qwen3MoeForCausalLM
    with pytest.raises(ValueError, match=r"mlp_only_layers \[1\], decoder_sparse_step 1\) is not supported"):
        moe.qwen3_moe_args(Qwen3MoeConfig(mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="decoder_sparse_step 2"):
        moe.qwen3_moe_args(Qwen3MoeConfig(decoder_sparse_step=2))


@pytest.mark.parametrize("name", MODELS)
def test_plan_counts_the_parameters_from_config_json(name, tiny_models):
    """`kiln plan` reads config.json without torch: the same total (its q/k norms aside) for Qwen3-MoE too, whose
    experts are moe_intermediate_size wide."""
    import json

    from engines.plan import shape_from_config

    loaded = tiny_models(name)[0]
    args = loaded.model.args
    shape = shape_from_config(json.loads((loaded.folder / "config.json").read_text()))
    head_norms = args.num_layers * 2 * args.head_dim if name == "qwen3-moe" else 0
    assert shape.params == architecture(args.model_type).param_count(args) - head_norms
