"""Fake tensorrt_llm.llmapi: the config classes with their 1.x field names, SamplingParams and outputs."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from tensorrt_llm._fake import Recorded
from tensorrt_llm.sampling_params import GuidedDecodingParams, guide_for_executor  # noqa: F401


class QuantAlgo(enum.Enum):  # tensorrt_llm/quantization/mode.py
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
    NVFP4 = "NVFP4"
    NO_QUANT = "NO_QUANT"


class CapacitySchedulerPolicy(enum.Enum):  # tensorrt_llm/llmapi/llm_args.py
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class QuantConfig(Recorded):
    FIELDS = frozenset(
        {
            "quant_algo",
            "kv_cache_quant_algo",
            "group_size",
            "smoothquant_val",
            "clamp_val",
            "use_meta_recipe",
            "has_zero_point",
            "pre_quant_scale",
            "exclude_modules",
        }
    )


class CalibConfig(Recorded):
    FIELDS = frozenset(
        {
            "device",
            "calib_dataset",
            "calib_batches",
            "calib_batch_size",
            "calib_max_seq_length",
            "random_seed",
            "tokenizer_max_seq_length",
        }
    )


class BuildConfig(Recorded):
    FIELDS = frozenset(
        {
            "max_input_len",
            "max_seq_len",
            "opt_batch_size",
            "max_batch_size",
            "max_beam_width",
            "max_num_tokens",
            "opt_num_tokens",
            "max_prompt_embedding_table_size",
            "kv_cache_type",
            "gather_context_logits",
            "gather_generation_logits",
            "strongly_typed",
            "max_draft_len",
            "speculative_decoding_mode",
            "use_refit",
            "plugin_config",
            "weight_streaming",
        }
    )

    def __init__(self, **kwargs):
        # builder.py BuildConfig's defaults (max_input_len 1024, max_seq_len None, ...) for what the caller leaves out
        from tensorrt_llm._build import BUILD_CONFIG_DEFAULTS, PluginConfig

        for key, value in BUILD_CONFIG_DEFAULTS.items():
            setattr(self, key, value)
        self.plugin_config = PluginConfig()
        super().__init__(**kwargs)


class KvCacheConfig(Recorded):
    FIELDS = frozenset(
        {
            "enable_block_reuse",
            "max_tokens",
            "max_attention_window",
            "sink_token_length",
            "free_gpu_memory_fraction",
            "host_cache_size",
            "onboard_blocks",
            "cross_kv_cache_fraction",
            "secondary_offload_min_priority",
            "event_buffer_max_size",
            "enable_partial_reuse",
            "copy_on_partial_reuse",
            "dtype",
        }
    )


class SchedulerConfig(Recorded):
    FIELDS = frozenset({"capacity_scheduler_policy", "context_chunking_policy", "dynamic_batch_config"})


class EagleDecodingConfig(Recorded):
    FIELDS = frozenset(
        {
            "max_draft_len",
            "speculative_model_dir",
            "eagle_choices",
            "greedy_sampling",
            "posterior_threshold",
            "use_dynamic_tree",
            "dynamic_tree_max_topK",
            "num_eagle_layers",
            "max_non_leaves_per_layer",
            "pytorch_weights_path",
            "eagle3_one_model",
        }
    )


class NGramDecodingConfig(Recorded):
    FIELDS = frozenset({"max_draft_len", "max_matching_ngram_size", "is_keep_all", "is_use_oldest", "is_public_pool"})


class DraftTargetDecodingConfig(Recorded):
    FIELDS = frozenset({"max_draft_len", "speculative_model_dir"})


class SamplingParams(Recorded):  # tensorrt_llm/sampling_params.py
    FIELDS = frozenset(
        {
            "end_id",
            "pad_id",
            "max_tokens",
            "bad",
            "bad_token_ids",
            "stop",
            "stop_token_ids",
            "include_stop_str_in_output",
            "embedding_bias",
            "logits_processor",
            "apply_batched_logits_processor",
            "n",
            "best_of",
            "use_beam_search",
            "top_k",
            "top_p",
            "top_p_min",
            "top_p_reset_ids",
            "top_p_decay",
            "seed",
            "temperature",
            "min_tokens",
            "beam_search_diversity_rate",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "length_penalty",
            "early_stopping",
            "no_repeat_ngram_size",
            "min_p",
            "logprobs",
            "prompt_logprobs",
            "return_context_logits",
            "return_generation_logits",
            "exclude_input_from_output",
            "return_encoder_output",
            "return_perf_metrics",
            "lookahead_config",
            "guided_decoding",
            "ignore_eos",
            "detokenize",
            "add_special_tokens",
            "truncate_prompt_tokens",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        }
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # SamplingParams.__post_init__ (tensorrt_llm/sampling_params.py): pad_id defaults to end_id (so end_id=-1 makes
        # pad_id -1 too), best_of to n; then _validate(). Set as attributes: `kwargs` stays what kiln passed.
        self.end_id = kwargs.get("end_id")
        self.pad_id = kwargs.get("pad_id", self.end_id)
        self.n = kwargs.get("n", 1)
        self.best_of = kwargs.get("best_of") or self.n
        self.top_k, self.top_p = kwargs.get("top_k"), kwargs.get("top_p")
        self.use_beam_search = kwargs.get("use_beam_search", False)
        self.ignore_eos = kwargs.get("ignore_eos", False)
        self.logprobs = kwargs.get("logprobs")
        self._validate()

    def _validate(self):
        """SamplingParams._validate, check for check."""
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of > 1 and self._greedy_decoding and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING"):
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns. Please set to best_of=1, got "
                f"best_of={self.best_of}. Please set to best_of=1 or set an environment variable "
                f"TLLM_ALLOW_N_GREEDY_DECODING=1 to allow best_of > 1 under the greedy decoding."
            )
        truncate = self.kwargs.get("truncate_prompt_tokens")
        if truncate is not None and truncate < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {truncate}")
        if self.kwargs.get("guided_decoding") is not None:  # two guides fail here
            self.kwargs["guided_decoding"]._validate()
        # "users might pass in logprob=True for Top-1 logprobs": 0 stays 0, which returns no logprobs at all
        self.logprobs = self.logprobs and int(self.logprobs)

    @property
    def _greedy_decoding(self) -> bool:
        """SamplingParams._greedy_decoding: top_k and top_p only; temperature plays no part."""
        return (
            not self.use_beam_search
            and (self.top_k is None or self.top_k == 1)
            and (self.top_p is None or self.top_p == 0.0)
        )


@dataclass
class Logprob:  # tensorrt_llm/executor/result.py
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:  # tensorrt_llm/executor/result.py
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list:
        return self.logprobs[self._last_logprobs_len :]


from tensorrt_llm._tensorrt_engine import LLM, RequestOutput  # noqa: E402,F401
