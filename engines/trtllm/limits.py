"""The sequence limits of a TensorRT engine: what kiln asks TensorRT-LLM 1.0 to compile, what the executor then
accepts, and what engine.json records so that kiln refuses a request before the engine does.

What TensorRT-LLM does with them:
- builder.py BuildConfig defaults max_input_len to 1024 and max_seq_len to None; _init_max_seq_len fills max_seq_len
  from max_position_embeddings, clips max_input_len to it and (check_max_num_tokens) max_num_tokens to
  max_seq_len * max_batch_size. With padding removal and context FMHA (PluginConfig's defaults) it ignores
  max_input_len.
- builder.py build() turns paged context FMHA (PluginConfig.use_paged_context_fmha, on by default) off for an INT8 KV
  cache, and for an FP8 KV cache unless the weights are FP8 or NVFP4 (FP8 context FMHA).
- The executor (cpp/tensorrt_llm/batch_manager/trtGptModel.h TrtGptModel) takes maxInputLen = max_seq_len - 1 with
  chunked context (LLM(enable_chunked_prefill=True) -> ExecutorConfig.enable_chunked_context, which
  TrtGptModelInflightBatching refuses without paged context FMHA), else min(max_seq_len - 1, max_num_tokens); a longer
  prompt fails that request (LlmRequest::validate: "Prompt length (N) exceeds maximum input length (M)").
- Without chunked context, BaseLLM._check_arguments (llmapi/llm.py) raises ValueError when prompt + max_tokens exceeds
  max_seq_len; with it, LlmRequest::validate shortens max_tokens to fit.
So kiln compiles max_seq_len = the model's context, turns chunked prefill on wherever paged context FMHA survives the
build (then a prompt may fill the context), and records max_input_len as the executor computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.base import ContextLengthExceededError

# KV cache quantizations and weight algorithms with which builder.build keeps paged context FMHA.
PAGED_CONTEXT_FMHA_KV = {None: None, "FP8": frozenset({"FP8", "NVFP4"})}  # None: any weights


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_seq_len: int  # prompt + completion
    max_num_tokens: int  # tokens one engine step takes (the prefill chunk with chunked prefill)
    max_input_len: int  # the longest prompt the executor accepts
    chunked_prefill: bool


def keeps_paged_context_fmha(quant_algo: str | None, kv_algo: str | None) -> bool:
    if kv_algo not in PAGED_CONTEXT_FMHA_KV:
        return False  # INT8 KV: "Paged Context FMHA is disabled because it doesn't work with int8 kv cache currently."
    algos = PAGED_CONTEXT_FMHA_KV[kv_algo]
    return algos is None or quant_algo in algos


def executor_max_input_len(max_seq_len: int, max_num_tokens: int, chunked_prefill: bool) -> int:
    """TrtGptModel's maxInputLen with padding removal and context FMHA (kiln never turns them off)."""
    return max_seq_len - 1 if chunked_prefill else min(max_seq_len - 1, max_num_tokens)


def plan(
    max_seq_len: int, max_batch_size: int, max_num_tokens: int, quant_algo: str | None, kv_algo: str | None
) -> EngineLimits:
    chunked = keeps_paged_context_fmha(quant_algo, kv_algo)
    max_num_tokens = min(max_num_tokens, max_seq_len * max_batch_size)  # check_max_num_tokens
    return EngineLimits(
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_input_len=executor_max_input_len(max_seq_len, max_num_tokens, chunked),
        chunked_prefill=chunked,
    )


def compiled(engine_config: dict, planned: EngineLimits) -> EngineLimits:
    """The limits of the engine TensorRT-LLM wrote (its config.json's build_config, as builder.build left it), so that
    engine.json records what was compiled even where kiln's plan and the builder disagree."""
    build = engine_config.get("build_config") or {}
    plugins = build.get("plugin_config") or {}
    max_seq_len = int(build.get("max_seq_len") or planned.max_seq_len)
    max_num_tokens = int(build.get("max_num_tokens") or planned.max_num_tokens)
    # PluginConfig stores its fields as "_name" behind properties: either spelling is read (kiln has not yet seen a
    # config.json written by a real 1.0 build); without the key, kiln's plan stands
    paged_context_fmha = plugins.get("use_paged_context_fmha", plugins.get("_use_paged_context_fmha", True))
    chunked = planned.chunked_prefill and bool(paged_context_fmha)
    return EngineLimits(
        max_batch_size=int(build.get("max_batch_size") or planned.max_batch_size),
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_input_len=executor_max_input_len(max_seq_len, max_num_tokens, chunked),
        chunked_prefill=chunked,
    )


def input_limit(trtllm, max_model_len: int) -> int | None:
    """The longest prompt a served engine takes (None: unknown): engine.json's max_input_len, or for an engine built
    before kiln recorded it (without chunked prefill), the executor's rule on its recorded limits."""
    if trtllm.max_input_len:
        return trtllm.max_input_len
    if not max_model_len:
        return None
    return executor_max_input_len(max_model_len, int(trtllm.build_config.get("max_num_tokens", 8192)), False)


def check_prompt_fits(request, manifest) -> None:
    """A prompt the executor would fail (LlmRequest::validate) gets kiln's context-length 400 instead."""
    limit = input_limit(manifest.trtllm, manifest.max_model_len or 0) if manifest.trtllm else None
    n_prompt = len(request.prompt_token_ids)
    if limit is not None and n_prompt > limit:
        raise ContextLengthExceededError(
            f"This engine takes prompts of at most {limit} tokens (TensorRT-LLM's maximum input length); the prompt "
            f"has {n_prompt}. Please reduce the length of the prompt."
        )
