"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from server.errors import bad_request
from server.generation import Generation
from server.logprobs import chat_logprobs
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
)
from server.respond import respond
from server.sampling import build_sampling_params
from server.text_check import check_text

router = APIRouter()


def _check_request(body: ChatCompletionRequest) -> int | None:
    """Request-level checks; returns the number of top logprobs to ask the engine for (None: none)."""
    if body.tools:
        raise bad_request("tools are not supported by this server.", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("Only response_format {'type': 'text'} is supported.", param="response_format")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    engine = state.engine_holder.get()
    model = state.engine_holder.check_model(body.model)
    top_k = _check_request(body)
    check_text(body)
    chars = body.num_content_chars
    check_prompt_chars(engine.tokenizer, chars, engine.info.max_model_len, "messages")
    # templating work grows with the messages too, not only with their text
    prompt_ids = await run_sized(chars + len(body.messages), render_chat, engine.tokenizer, body.messages)
    params = build_sampling_params(body, body.requested_max_tokens, top_k, len(prompt_ids), engine.info)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(engine, state.metrics, model, response_id, [(prompt_ids, params)], body.stop_strings,
                            body.speculative)
    strings = state.engine_holder.token_strings

    def logprobs_of(entries) -> ChatChoiceLogprobs | None:
        if top_k is None:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(entries, top_k, strings))

    def make_response(results):
        return ChatCompletionResponse(
            id=response_id,
            model=model,
            choices=[
                ChatChoice(index=r.index, message=ChatMessageOut(content=r.text),
                           logprobs=logprobs_of(r.logprobs), finish_reason=r.finish_reason)
                for r in results
            ],
            usage=generation.usage(),
        )

    created = int(time.time())

    def chunk(choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage)

    async def make_chunks():
        for choice in generation.choices:
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
        async for deltas in generation:
            for delta in deltas:
                # a chunk for every step that generated tokens, even while their text is held back (as completions)
                if delta.text or delta.num_tokens and not delta.finish_reason or (top_k is not None and delta.logprobs):
                    yield chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(content=delta.text),
                                                 logprobs=logprobs_of(delta.logprobs))])
                if delta.finish_reason:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(),
                                                 finish_reason=delta.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=generation.usage())

    return await respond(request, generation, body.stream, make_response, make_chunks)
