"""A reference model's greedy answers to the held-out prompts, decoded a layer at a time with a KV cache.

The build never holds the float model whole (engines/build/stream.py), so each answer token costs one pass over the
checkpoint, layer by layer (a pre-quantized build holds its model and passes over it the same way). What a pass runs
is only what the KV cache does not hold yet: the prompts on the first pass, then each unfinished answer's newest
token. The KV cache of every layer is kept across passes for a group of prompts, all in one flat batch; groups are
sized so their cache stays within GROUP_KV_BYTES, which bounds what the answers add to the build's memory. Without
that cache, each pass would rerun every prompt and answer so far: the answers of the embedded default model took
half a minute per token on two cores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from engines.build.stream import FP32, Checkpoint, load_layer
from engines.torch.attention import AttentionMetadata, PrefillSpan
from engines.torch.model_runner import KVCache
from engines.torch.models.protocol import CausalLM

GROUP_KV_BYTES = 1 << 30
BLOCK_SIZE = 16


def streamed_greedy_answers(
    checkpoint: Checkpoint,
    shell: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    progress: bool = True,
) -> list[list[int]]:
    """The float32 model's greedy answers, its layers read from the checkpoint on every pass. shell: its float32
    shell (Checkpoint.shell)."""

    def read(i: int) -> None:
        load_layer(shell, i, checkpoint.layer(i), {}, FP32, checkpoint.device)

    return greedy_answers(shell, prompts, max_new_tokens, eos_token_ids, checkpoint.device, read, progress)


@torch.inference_mode()
def greedy_answers(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    device: torch.device,
    read_layer: Callable[[int], None] | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """`model`'s greedy answers in float32 with a float32 KV cache (stopping after EOS or max_new_tokens).
    read_layer(i) loads layer i into a model assembled without its layers (freed after its turn); None: the model
    holds them."""
    a = model.args
    per_token = KVCache.bytes_per_block(a.num_layers, 1, a.num_kv_heads, a.head_dim, FP32)
    groups = kv_groups([len(p) + max_new_tokens for p in prompts], per_token, GROUP_KV_BYTES)
    model.init_rope(max(len(p) for p in prompts) + max_new_tokens, FP32, device)
    answers: list[list[int]] = []
    with tqdm(total=len(prompts), desc="reference answers", unit="prompt", disable=not progress) as bar:
        for group in groups:
            group_prompts = [prompts[k] for k in group]
            answers += _decode_group(model, group_prompts, max_new_tokens, eos_token_ids, device, read_layer)
            bar.update(len(group))
    return answers


def kv_groups(lengths: list[int], bytes_per_token: int, budget: int) -> list[range]:
    """Consecutive index ranges whose sequences' KV (lengths[k] tokens each) fits `budget` bytes; a sequence that
    alone exceeds it is a group of its own."""
    groups, start, used = [], 0, 0
    for k, n in enumerate(lengths):
        need = n * bytes_per_token
        if k > start and used + need > budget:
            groups.append(range(start, k))
            start, used = k, 0
        used += need
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def _decode_group(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: list[int],
    device: torch.device,
    read_layer: Callable[[int], None] | None,
) -> list[list[int]]:
    a = model.args
    blocks = [-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in prompts]
    first_block = [sum(blocks[:k]) for k in range(len(prompts))]
    kv = KVCache(a.num_layers, sum(blocks), BLOCK_SIZE, a.num_kv_heads, a.head_dim, FP32, device)
    cached = [0] * len(prompts)  # tokens of sequence k in the KV cache
    pending = [list(p) for p in prompts]  # tokens of sequence k not in it yet
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        positions, meta, last_rows = _step_metadata(active, cached, pending, first_block, device)
        x = model.embed(torch.tensor([t for k in active for t in pending[k]], dtype=torch.long, device=device))
        rope = (model.cos[positions].unsqueeze(1), model.sin[positions].unsqueeze(1))
        for i in range(a.num_layers):
            if read_layer is not None:
                read_layer(i)
            layer = model.layers[i]
            x, out = model.decoder_layer(
                layer, x, model.layer_input(layer, x), positions, rope, kv.layers[i], meta, None
            )
            if read_layer is not None:
                model.unload_layer(i)
        tokens = model.compute_logits(out[last_rows]).argmax(-1).tolist()
        for k, token in zip(active, tokens):
            cached[k] += len(pending[k])
            pending[k] = [token]
            answers[k].append(token)
        active = [k for k in active if answers[k][-1] not in eos]
        if not active:
            break
    return answers


def _step_metadata(
    active: list[int], cached: list[int], pending: list[list[int]], first_block: list[int], device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """One flat batch of each active sequence's pending tokens, each attending to its cached tokens and itself:
    (positions, attention metadata, the row of each sequence's last token)."""
    positions, slots, spans, last_rows = [], [], [], []
    for k in active:
        start, n = cached[k], len(pending[k])
        span, q_start = range(start, start + n), len(positions)
        positions += span
        slots += [first_block[k] * BLOCK_SIZE + p for p in span]
        table = torch.arange(first_block[k], first_block[k] + -(-(start + n) // BLOCK_SIZE), device=device)
        spans.append(PrefillSpan(q_start, n, start + n, table))
        last_rows.append(q_start + n - 1)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        num_decode_tokens=0,
        decode_block_tables=None,
        decode_context_lens=None,
        decode_max_context=0,
        prefills=spans,
    )
    return torch.tensor(positions, device=device), meta, torch.tensor(last_rows, device=device)
