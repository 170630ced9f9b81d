"""kiln's settings as TensorRT-LLM 1.x LLM-API objects: the build's QuantConfig, CalibConfig and
BuildConfig, and the runtime's KvCacheConfig, SchedulerConfig and SamplingParams.

Field names follow tensorrt_llm/llmapi/llm_args.py, tensorrt_llm/quantization/mode.py (QuantAlgo),
tensorrt_llm/builder.py (BuildConfig) and tensorrt_llm/sampling_params.py (SamplingParams, GuidedDecodingParams) of
the 1.x releases."""

from __future__ import annotations

import functools
import json
import re

from engines.base import SamplingParams, StructuredOutput
from engines.structured_schema import check_json_schema
from engines.trtllm import flows
from engines.trtllm.api import TrtllmApi, TrtllmUnsupported, trtllm_mapping
from engines.trtllm.flows import KV_ALGO  # each precision's QuantAlgo is its scheme's (engines/schemes)
from engines.trtllm.limits import EngineLimits


def quant_config(api: TrtllmApi, precision: str, kv_cache_dtype: str, group_size: int):
    mapping = trtllm_mapping(precision)
    algo = api.llmapi.QuantAlgo
    kwargs: dict[str, object] = {}
    if mapping.quant_algo:
        kwargs["quant_algo"] = getattr(algo, mapping.quant_algo)
    if KV_ALGO[kv_cache_dtype]:
        kwargs["kv_cache_quant_algo"] = getattr(algo, KV_ALGO[kv_cache_dtype])
    if mapping.grouped:
        kwargs["group_size"] = group_size
    kwargs.update(mapping.quant_config)
    return api.llmapi.QuantConfig(**kwargs)


def stored_quant_config(api: TrtllmApi, quant_algo: str, kv_algo: str | None):
    """A pre-quantized checkpoint's own algorithms (engines/trtllm/checkpoints.py), as TensorRT-LLM reads them from it
    again: the same values, so ModelLoader._update_from_hf_quant_config finds nothing conflicting."""
    algo = api.llmapi.QuantAlgo
    kwargs = {"quant_algo": getattr(algo, quant_algo)}
    if kv_algo:
        kwargs["kv_cache_quant_algo"] = getattr(algo, kv_algo)
    return api.llmapi.QuantConfig(**kwargs)


def needs_calibration(precision: str, kv_cache_dtype: str) -> bool:
    """Only TensorRT-LLM's ModelOpt flow calibrates a pair kiln builds (engines/trtllm/flows.py)."""
    return flows.flow(precision, kv_cache_dtype) is flows.Flow.MODELOPT


def calib_config(api: TrtllmApi, dataset_dir: str, samples: int, max_seq_length: int):
    """dataset_dir: a folder holding train.jsonl of {"text": ...} lines (kiln's or the user's chat requests
    rendered through the model's chat template), which TensorRT-LLM's calibration loads as a dataset."""
    return api.llmapi.CalibConfig(
        calib_dataset=dataset_dir, calib_batches=samples, calib_batch_size=1, calib_max_seq_length=max_seq_length
    )


def build_config(api: TrtllmApi, limits: EngineLimits, gather_generation_logits: bool):
    """In-flight batching over a paged KV cache, padding removal and (paged) context FMHA are BuildConfig's
    defaults, so kiln only sizes the engine: every limit explicitly (BuildConfig's max_input_len would be 1024; see
    engines/trtllm/limits.py), and gather_generation_logits when logprobs are wanted (--gather-logits)."""
    return api.llmapi.BuildConfig(
        max_batch_size=limits.max_batch_size,
        max_num_tokens=limits.max_num_tokens,
        max_seq_len=limits.max_seq_len,
        max_input_len=limits.max_input_len,
        gather_generation_logits=gather_generation_logits,
    )


def kv_cache_config(api: TrtllmApi, free_gpu_memory_fraction: float, enable_block_reuse: bool):
    return api.llmapi.KvCacheConfig(
        free_gpu_memory_fraction=free_gpu_memory_fraction, enable_block_reuse=enable_block_reuse
    )


SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")


def scheduler_config(api: TrtllmApi, policy: str):
    if policy not in SCHEDULER_POLICIES:
        raise TrtllmUnsupported(f"the scheduler policy must be one of {', '.join(SCHEDULER_POLICIES)}, got {policy!r}.")
    member = getattr(api.llmapi.CapacitySchedulerPolicy, policy.upper())
    return api.llmapi.SchedulerConfig(capacity_scheduler_policy=member)


def check_no_speculation(method: str | None) -> None:
    """TensorRT-LLM 1.0 runs n-gram and draft-target speculation only in its PyTorch backend
    (NGramDecodingConfig / DraftTargetDecodingConfig.supports_backend("pytorch")); a TensorRT engine speculates only
    when it was compiled for it (BuildConfig.speculative_decoding_mode, e.g. EAGLE from an EAGLE checkpoint), and
    `kiln build --backend trtllm` compiles no such engine. So every method is refused before the engine loads."""
    if method is not None:
        raise TrtllmUnsupported(
            f"the trtllm backend does not run speculative decoding ({method}): TensorRT-LLM speculates on a "
            "TensorRT engine only when it was built for it, which kiln's trtllm build does not do; serve without "
            "--speculative-method, or use --backend torch."
        )


# The LLM's guided_decoding_backend (llmapi/llm_args.py BaseLlmArgs: Literal["xgrammar", "llguidance"], default None).
# _TrtLLM._build_model (llmapi/llm.py) gives a TensorRT engine's executor a GuidedDecodingConfig for "xgrammar" and
# raises ValueError("Unsupported guided decoding backend ...") for anything else (llguidance is PyTorch-backend only);
# without one, the C++ Executor::Impl::fetchNewRequests fails every guided request ("... but GuidedDecoder is not
# setup"), which the LLM API raises as a RequestError while the result streams.
GUIDED_DECODING_BACKEND = "xgrammar"
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# The metacharacters of xgrammar's regex dialect (cpp/regex_converter.cc RegexConverter::Convert), which its escape
# table (HandleCharEscape's CUSTOM_ESCAPE_MAP) accepts escaped. re.escape is Python's dialect: it also escapes space,
# '-', '#', '&', '~' and whitespace, escapes xgrammar does not know: it warns and matches the character (an older
# release matched the one after it), so choices are escaped with this set only.
XGRAMMAR_REGEX_METACHARACTERS = frozenset("\\^$.*+?()[]{}|")


def choice_regex(choices: tuple[str, ...]) -> str:
    """The regex that matches exactly one of `choices`, in xgrammar's dialect. An empty choice goes last: xgrammar's
    converter reads "(a|)" as an empty alternative, while older releases reject "(|a)"."""
    options = sorted(dict.fromkeys(choices), key=lambda c: c == "")
    escaped = ("".join("\\" + ch if ch in XGRAMMAR_REGEX_METACHARACTERS else ch for ch in o) for o in options)
    return "(" + "|".join(escaped) + ")"


@functools.lru_cache(maxsize=256)
def _check_compiles(field: str, text: str) -> None:
    """Parse the guide with the xgrammar Python package (a tensorrt_llm dependency) before it reaches the executor:
    there, GuidedDecoder::build (cpp/tensorrt_llm/batch_manager/guidedDecoder.cpp) compiles it inside forwardAsync,
    and Executor::Impl::forwardAsync answers an exception by terminating every active request, not just this one."""
    try:
        import xgrammar
    except ImportError:  # only outside the TensorRT-LLM image (kiln's CPU machines); nothing to protect there
        return
    parse = {
        "json": xgrammar.Grammar.from_json_schema,
        "regex": xgrammar.Grammar.from_regex,
        "grammar": xgrammar.Grammar.from_ebnf,
    }[field]
    try:
        parse(text)
    except Exception as exc:  # xgrammar raises RuntimeError("[time] file.cc:line: message")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = re.sub(r"^\[[^]]*\]\s*\S+:\d+:\s*", "", first)[:300].rstrip(".")
        raise ValueError(f"The {field} constraint is not valid: {reason}.") from exc


def guided_decoding(api: TrtllmApi, structured: StructuredOutput):
    """kiln's StructuredOutput as TensorRT-LLM's GuidedDecodingParams (tensorrt_llm/sampling_params.py), which takes
    one of json (schema text, passed on as is), json_object, regex, grammar (EBNF) or structural_tag; json_object
    becomes the schema of any object and choice a regex alternation. Raises ValueError (TrtllmUnsupported for what
    TensorRT-LLM cannot do) in one sentence."""
    kind, value = structured.kind, structured.value
    if kind == "json_object":
        # not json_object=True: that compiles xgrammar's builtin JSON grammar, whose root is an object or an array,
        # while kiln's json_object is an object (as in the torch backend)
        return api.llmapi.GuidedDecodingParams(json=JSON_OBJECT_SCHEMA)
    if kind == "choice":
        if not structured.choices:
            raise ValueError("A choice constraint needs at least one choice.")
        field, value = "regex", choice_regex(structured.choices)
    elif kind == "grammar":
        if "::=" not in value:  # TensorRT-LLM hands grammars to xgrammar::Grammar::FromEBNF, which has no Lark reader
            raise TrtllmUnsupported(
                "the trtllm backend takes grammars in xgrammar's EBNF dialect (rules written `root ::= ...`), not Lark."
            )
        field = "grammar"
    elif kind in ("json", "regex"):
        field = kind
        if kind == "json":  # TensorRT-LLM's xgrammar leaves the same keywords unenforced as kiln's
            check_json_schema(json.loads(value))
    else:
        raise TrtllmUnsupported(f"the trtllm backend has no guided decoding for {kind!r} constraints.")
    _check_compiles(field, value)
    return api.llmapi.GuidedDecodingParams(**{field: value})


# A logprobs request on an engine built without generation logits (engine.json's trtllm.gather_generation_logits)
LOGPROBS_REFUSAL = (
    "logprobs need a TensorRT-LLM engine built with generation logits; rebuild the engine with "
    "`kiln build --backend trtllm --gather-logits`."
)


def sampling_params(
    api: TrtllmApi, params: SamplingParams, eos_token_ids: list[int], vocab_size: int, gather_logits: bool = False
):
    """kiln's SamplingParams as TensorRT-LLM's. Greedy is temperature 0 in kiln and top_k 1 (top_p unset) in
    TensorRT-LLM (SamplingParams._greedy_decoding, tensorrt_llm/sampling_params.py, reads only those two); its
    _validate refuses greedy with n > 1 ("Greedy decoding in the LLM API does not allow multiple returns"), so a
    greedy request asks for one sequence and the engine copies it into the n choices, as kiln's torch backend's n
    greedy choices are identical. ignore_eos is SamplingParams.ignore_eos with the real end_id: the executor request
    then gets end_id -1 and the real pad_id (executor/worker.py _enqueue_request), where end_id=-1 here would also
    make pad_id -1 (SamplingParams.__post_init__). logit_bias has no TensorRT-LLM field and is refused; a structured
    constraint becomes guided_decoding.

    Logprobs: BaseLLM._check_arguments (llmapi/llm.py) refuses them unless the LLM was given
    gather_generation_logits, which kiln does when the engine was built with it (`gather_logits`); otherwise this
    refuses in one sentence. TensorRT-LLM's logprobs=k returns the top k plus the sampled token, and a falsy 0 returns
    nothing, so OpenAI's top_logprobs 0 (the chosen token only) asks for 1 and kiln keeps the chosen token."""
    if params.logprobs is not None and not gather_logits:
        raise TrtllmUnsupported(LOGPROBS_REFUSAL)
    if params.logit_bias:
        raise TrtllmUnsupported("logit_bias is not supported by the trtllm backend.")
    if params.prompt_logprobs is not None:
        # a TensorRT engine returns prompt logits only when built with gather_context_logits, which kiln's
        # builds do not set (it would keep [prompt, vocab] logits of every request)
        raise TrtllmUnsupported(
            "prompt logprobs (echo with logprobs, prompt_logprobs) are not supported by the trtllm backend."
        )
    kwargs = dict(
        max_tokens=params.max_tokens,
        n=1 if params.greedy else params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if 0 < params.top_k < vocab_size else None,
        min_p=params.min_p or None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        seed=params.seed,
        min_tokens=params.min_tokens or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        logprobs=None if params.logprobs is None else max(params.logprobs, 1),
        detokenize=False,  # kiln detokenizes (stop strings, incremental text) like for the torch backend
        end_id=eos_token_ids[0] if eos_token_ids else None,
        ignore_eos=params.ignore_eos or None,
        guided_decoding=guided_decoding(api, params.structured) if params.structured else None,
    )
    if params.greedy:
        kwargs["top_k"] = 1
        kwargs["top_p"] = None
    if not params.ignore_eos and len(eos_token_ids) > 1:  # the other EOS ids stop too, reported as EOS
        kwargs["stop_token_ids"] = list(dict.fromkeys((kwargs["stop_token_ids"] or []) + eos_token_ids[1:]))
    return api.llmapi.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
