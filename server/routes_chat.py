"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from server.chat_tools import ToolPlan, assemble, output_reader, plan_tools
from server.errors import bad_request
from server.generation import Generation
from server.logprobs import chat_logprobs, vllm_prompt_logprobs
from server.offload import run_sized
from server.prompt_bound import check_prompt_chars
from server.prompts import render_chat
from server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    FunctionCallDelta,
    ToolCallDelta,
)
from server.request_id import engine_request_id
from server.respond import respond
from server.sampling import build_sampling_params, check_fields
from server.structured import structured_output
from server.text_check import check_text
from server.tools.events import ContentDelta

router = APIRouter()


def _check_request(body: ChatCompletionRequest) -> int | None:
    """Request-level checks; returns the number of top logprobs to ask the engine for (None: none)."""
    check_fields(body)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs is not supported with stream.", param="prompt_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    engine = state.engine_holder.get()
    model = state.engine_holder.check_model(body.model)
    top_k = _check_request(body)
    plan = plan_tools(body, getattr(engine.tokenizer, "chat_template", None), state.settings.tool_call_parser)
    structured = _constraint(body, plan)
    check_text(body)
    chars = body.num_content_chars
    check_prompt_chars(engine.tokenizer, chars, engine.info.max_model_len, "messages")
    # templating work grows with the messages too, not only with their text
    prompt_ids = await run_sized(
        chars + len(body.messages), render_chat, engine.tokenizer, body.messages, plan.prompt_tools
    )
    params = build_sampling_params(
        body, body.requested_max_tokens, top_k, len(prompt_ids), engine.info, structured, body.prompt_logprobs
    )
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(
        engine,
        state.metrics,
        model,
        engine_request_id(request),
        [(prompt_ids, params)],
        body.stop_strings,
        body.speculative,
    )
    strings = state.engine_holder.token_strings

    def logprobs_of(entries) -> ChatChoiceLogprobs | None:
        if top_k is None:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(entries, top_k, strings))

    def make_choice(r) -> ChatChoice:
        reader = output_reader(plan)
        content, tool_calls = assemble(reader.feed(r.text) + reader.finish())
        return ChatChoice(
            index=r.index,
            message=ChatMessageOut(content=content, tool_calls=tool_calls),
            logprobs=logprobs_of(r.logprobs),
            finish_reason=_finish_reason(r.finish_reason, tool_calls),
        )

    def make_response(results):
        prompt = (
            vllm_prompt_logprobs(generation.prompt_logprobs[0], strings) if body.prompt_logprobs is not None else None
        )
        return ChatCompletionResponse(
            id=response_id,
            model=model,
            choices=[make_choice(r) for r in results],
            usage=generation.usage(),
            prompt_logprobs=prompt,
        )

    created = int(time.time())

    def chunk(choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage)

    async def make_chunks():
        readers = {choice.index: output_reader(plan) for choice in generation.choices}
        called = {choice.index: False for choice in generation.choices}
        for choice in generation.choices:
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
        async for deltas in generation:
            for delta in deltas:
                reader = readers[delta.index]
                events = reader.feed(delta.text) + (reader.finish() if delta.finish_reason else [])
                called[delta.index] |= any(not isinstance(e, ContentDelta) for e in events)
                if delta.needs_chunk(has_content=bool(events), wants_logprobs=top_k is not None):
                    yield chunk(
                        [ChatChunkChoice(index=delta.index, delta=_delta(events), logprobs=logprobs_of(delta.logprobs))]
                    )
                if delta.finish_reason:
                    reason = (
                        "tool_calls" if called[delta.index] and delta.finish_reason == "stop" else delta.finish_reason
                    )
                    yield chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=reason)])
        if body.include_usage:
            yield chunk([], usage=generation.usage())

    return await respond(request, generation, body.stream, make_response, make_chunks)


def _constraint(body: ChatCompletionRequest, plan: ToolPlan):
    """The output's one constraint: the request's structured-output fields, or the tool choice's."""
    requested = structured_output(body)
    if requested is not None and plan.structured is not None:
        raise bad_request(
            f"tool_choice {plan.mode} constrains the output itself; it cannot be combined with "
            "response_format or structured_outputs.",
            param="tool_choice",
        )
    return requested or plan.structured


def _finish_reason(reason: str, tool_calls) -> str:
    return "tool_calls" if tool_calls and reason == "stop" else reason


def _delta(events) -> ChatDelta:
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [
        ToolCallDelta(
            index=e.index,
            id=e.id,
            type="function" if e.id else None,
            function=FunctionCallDelta(name=e.name, arguments=e.arguments),
        )
        for e in events
        if not isinstance(e, ContentDelta)
    ]
    return ChatDelta(content=text if text or not calls else None, tool_calls=calls or None)
