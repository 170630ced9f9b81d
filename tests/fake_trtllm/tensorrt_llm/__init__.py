"""A recording fake of the `tensorrt_llm` package (1.x LLM API), for kiln's contract tests only.

tensorrt_llm cannot be installed on kiln's CPU machines. This fake has the classes and field names kiln
uses, checked against TensorRT-LLM 1.x sources:
- tensorrt_llm/_tensorrt_engine/__init__.py: `LLM` is `tensorrt_llm.llmapi.llm._TrtLLM`, the LLM class
  that builds and runs TensorRT engines (`save()`, `generate_async()`, `get_stats()`, `shutdown()`);
- tensorrt_llm/llmapi/__init__.py: QuantConfig, QuantAlgo, CalibConfig, BuildConfig, KvCacheConfig,
  SchedulerConfig, CapacitySchedulerPolicy, EagleDecodingConfig, NGramDecodingConfig,
  DraftTargetDecodingConfig, SamplingParams, RequestOutput, CompletionOutput;
- tensorrt_llm/llmapi/llm_args.py (CalibConfig, KvCacheConfig, SchedulerConfig, *DecodingConfig fields),
  tensorrt_llm/models/modeling_utils.py (QuantConfig), tensorrt_llm/quantization/mode.py (QuantAlgo),
  tensorrt_llm/builder.py (BuildConfig), tensorrt_llm/sampling_params.py (SamplingParams),
  tensorrt_llm/executor/result.py (CompletionOutput: token_ids_diff, logprobs_diff, finish_reason in
  stop/length/timeout/cancelled, stop_reason; GenerationResult.abort(); async iteration while streaming).
- guided decoding: tensorrt_llm/sampling_params.py (GuidedDecodingParams, validated by SamplingParams), the LLM's
  guided_decoding_backend (llmapi/llm_args.py, llmapi/llm.py _TrtLLM._build_model) and the executor's error for a
  guided request without one (RequestError, tensorrt_llm/executor/utils.py); see sampling_params.py. The fake
  records the guide the executor would get but does not constrain its generations.
Every config class refuses a keyword the real one does not have, so a misspelt field fails the tests.
Everything kiln does to the fake is appended to CALLS.
"""

from tensorrt_llm._fake import CALLS, FAKE, reset  # noqa: F401

__version__ = "1.0.0+kiln-fake"
