"""Pydantic models of every request and response body, shaped like OpenAI's API.

A request field kiln does not implement is refused with a 400 naming it (`unknown_fields`), except the
metadata in METADATA_FIELDS, which changes nothing about the output, and the fields SGLang-derived routers add
to every request (ROUTER_DEFAULTS) while they carry the value that asks for what kiln does anyway; inside messages
and other nested objects unknown keys are ignored (SDKs send back assistant messages with keys like `refusal: null`).
Responses are built explicitly so that `null` fields appear where OpenAI shows them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from engines.base import SEED_RANGE

# Limits on request sizes that would otherwise cost the whole server time (README: "Limits and failure
# behaviour"); the body size itself is limited before parsing (server/body_limit.py).
MAX_MESSAGES = 4096
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_PROMPTS = 1024
MAX_CHOICES = 1024  # structured-output choice strings
MAX_TOOLS = 128

# Accepted and ignored: they describe the request or how OpenAI would store it, not what to generate.
METADATA_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})

# vllm-router (and sglang-router, which it derives from) re-serialize every chat or completions body with these
# fields at SGLang's defaults, whatever the client sent. Each value below asks for kiln's own behaviour (special
# tokens skipped, stop strings trimmed, no continued final message, no hidden states; the reasoning switches only
# act through a reasoning parser, which kiln does not have), so accepting it changes nothing; any other value is
# still refused as unimplemented.
ROUTER_DEFAULTS: dict[str, bool] = {
    "skip_special_tokens": True,
    "no_stop_trim": False,
    "continue_final_message": False,
    "return_hidden_states": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "include_reasoning": True,
}

# Every integer of a request fits in 64 bits, so none can overflow a tensor or a C call later.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _check_stop(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if any(stop == "" for stop in stops):
        raise ValueError("stop strings must not be empty")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
    return stops


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is not None and len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed, got {len(value)}")
    for key in value or {}:
        try:
            int(key)
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    return value


class StreamOptions(_Request):
    include_usage: bool = False


# ---- structured outputs -------------------------------------------------------------------------
class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=MAX_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None


def unknown_fields(extra: dict[str, Any] | None) -> list[str]:
    """The fields of a request body's top level that kiln does not implement, sorted."""
    return sorted(
        name
        for name, value in (extra or {}).items()
        if name not in METADATA_FIELDS and not (name in ROUTER_DEFAULTS and value is ROUTER_DEFAULTS[name])
    )


# ---- shared sampling fields ---------------------------------------------------------------------
class SamplingFields(_Request):
    # the top level keeps unknown fields so that `unknown_fields` can name them
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Int64 = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # kiln's extension: false opts this request out of speculative decoding (when the server runs it)
    speculative: bool = True
    # vLLM's: the prompt tokens' logprobs and this many alternatives (a response field of that name)
    prompt_logprobs: Int64 | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, max_length=MAX_CHOICES)
    guided_grammar: str | None = None

    @property
    def unknown_fields(self) -> list[str]:
        return unknown_fields(self.model_extra)

    @field_validator("stop")
    @classmethod
    def _validate_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        _check_stop(value)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _validate_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return _check_logit_bias(value)

    @property
    def stop_strings(self) -> list[str]:
        return _check_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- chat ---------------------------------------------------------------------------------------
class ContentPart(_Request):
    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got a {part.type!r} part")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def num_content_chars(self) -> int:
        """Characters of text in the messages (a lower bound on the rendered prompt's)."""
        return sum(
            len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or ())
            for m in self.messages
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ToolCallDelta(BaseModel):
    """A streamed tool call: the first delta of a call has its id, type and name, later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- completions --------------------------------------------------------------------------------
PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Int64 | None = 16  # OpenAI's and vLLM's default; null: up to the rest of the context, as in chat
    echo: bool = False
    logprobs: Int64 | None = None
    suffix: str | None = None
    best_of: Int64 | None = None

    @field_validator("prompt", mode="before")  # before the union's own errors, which are hard to read
    @classmethod
    def _check_prompt(cls, value: Any) -> PromptInput:
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(shape if not isinstance(value, list) else "prompt must not be an empty list")
        if len(value) > MAX_PROMPTS and not isinstance(value[0], int):
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(value)}")
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return value
        if all(isinstance(item, list) for item in value):
            for item in value:
                if not item or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                    raise ValueError("each token-id list in prompt must be a non-empty list of integers")
            return value
        raise ValueError(shape)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, one per engine request."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (None for the first), token id -> its logprob, rank and text
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


# ---- models, health, metadata -------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    object: Literal["health.response"] = "health.response"
    status: Literal["live", "ready", "loading", "failed", "dead", "draining"]
    message: str


class VersionResponse(BaseModel):
    version: str


class MetadataResponse(BaseModel):
    model: str
    source_model: str
    backend: str
    precision: str
    kv_cache_dtype: str
    hardware: str
    profile: str | None
    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    kv_capacity_tokens: int
    speculative: dict[str, Any] | None  # configuration and counters; None when speculative decoding is off
    versions: dict[str, str]
    extra: dict[str, Any]


# ---- tokenizer (vLLM's /tokenize and /detokenize) ----------------------------------------------
class _TokenizerRequest(_Request):
    # the top level keeps unknown fields so that check_fields can name them (as SamplingFields does)
    model_config = ConfigDict(extra="allow")

    model: str | None = None

    @property
    def unknown_fields(self) -> list[str]:
        # vllm-router's cache_aware policy tokenizes every chat through /tokenize with continue_final_message
        return unknown_fields(self.model_extra)


class TokenizeRequest(_TokenizerRequest):
    """vLLM's TokenizeCompletionRequest (`prompt`) and TokenizeChatRequest (`messages`) in one body."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    add_generation_prompt: bool = True
    # None: true for a prompt, false for messages (the chat template adds the special tokens itself)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("the request must give exactly one of prompt (a string) and messages")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools are only allowed with messages")
        return self

    @property
    def num_content_chars(self) -> int:
        """Characters of text in the prompt or the messages (a lower bound on the rendered prompt's)."""
        if self.messages is None:
            assert self.prompt is not None  # _one_input: exactly one of prompt and messages is given
            return len(self.prompt)
        return sum(
            len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or ())
            for m in self.messages
        )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_TokenizerRequest):
    tokens: list[Int64]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- responses (OpenAI's Responses API: server/routes_responses.py) ------------------------------
from pydantic import Discriminator, Tag  # noqa: E402 - here so that the lines above stay as they are


class ResponsesInputText(_Request):
    # output_text: an assistant message sent back as it came out
    type: Literal["input_text", "output_text"]
    text: str


class ResponsesMessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: list[ResponsesInputText]

    @field_validator("content", mode="before")  # a list only, so that a bad part's error names that part
    @classmethod
    def _text_as_part(cls, value: Any) -> Any:
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class ResponsesFunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class ResponsesFunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str


def _item_kind(value: Any) -> str:
    """Messages may leave out their type; any other type (reasoning, item_reference...) matches no tag: a 400."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


ResponsesInputItem = Annotated[
    Annotated[ResponsesMessageItem, Tag("message")]
    | Annotated[ResponsesFunctionCallItem, Tag("function_call")]
    | Annotated[ResponsesFunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class ResponsesFunctionTool(_Request):
    """The Responses API's flat function tool (chat nests these fields under `function`)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(_Request):
    type: Literal["function"]
    name: str


ResponsesToolChoice = Literal["none", "auto", "required"] | ResponsesNamedToolChoice


class ResponsesTextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesTextConfig(BaseModel):
    # forbid: `verbosity` and future keys change the output, so they are refused, not ignored
    model_config = ConfigDict(extra="forbid")
    format: ResponsesTextFormat = ResponsesTextFormat(type="text")


class ResponsesRequest(_Request):
    # the top level keeps unknown fields so that check_fields can name them (as SamplingFields does)
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: list[ResponsesInputItem] = Field(default_factory=list, max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: Int64 | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: ResponsesTextConfig = ResponsesTextConfig()
    tools: list[ResponsesFunctionTool] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_choice: ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    truncation: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None

    # Unions report an error once per member (`input.str`, `input.list[...]`); these make one error name its field.
    @field_validator("input", mode="before")
    @classmethod
    def _text_as_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {value!r}")
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tool_choice of type {value.get('type')!r} is not supported; only functions are")
        return value

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(set(self.model_extra or ()) - METADATA_FIELDS)


class ResponsesOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)


class ResponsesOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[ResponsesOutputText] = Field(default_factory=list)


class ResponsesOutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


ResponsesOutputItem = ResponsesOutputMessage | ResponsesOutputFunctionCall


class ResponsesInputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # the SDK requires it; kiln's prefix cache has no separate write cost


class ResponsesOutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponsesInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponsesOutputTokensDetails = ResponsesOutputTokensDetails()
    total_tokens: int


class ResponsesIncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: ResponsesIncompleteDetails | None = None
    model: str
    output: list[ResponsesOutputItem] = Field(default_factory=list)
    usage: ResponsesUsage | None = None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    tools: list[ResponsesFunctionTool]
    tool_choice: ResponsesToolChoice
    parallel_tool_calls: bool
    text: ResponsesTextConfig
    truncation: Literal["disabled"] = "disabled"
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]
    user: str | None
