"""POST /v1/responses: OpenAI's Responses API, run through the chat pipeline (the input rendered as chat
messages by the chat template, one choice). What is refused and why: README, "Responses API"."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from typing import Literal

from fastapi import APIRouter, Request

from server.chat_tools import ToolPlan, output_reader, plan_tools
from server.errors import APIError, bad_request
from server.generation import Generation
from server.offload import run_sized
from server.prompt_bound import check_prompt_chars
from server.prompts import render_chat
from server.protocol import (
    ResponseObject,
    ResponsesIncompleteDetails,
    ResponsesInputTokensDetails,
    ResponsesRequest,
    ResponsesUsage,
    Usage,
)
from server.request_id import engine_request_id
from server.respond import respond
from server.responses_input import chat_request, text_constraint
from server.responses_output import OutputBuilder, as_input_items
from server.responses_store import StoredResponse, store_of
from server.responses_stream import stream_response
from server.sampling import build_sampling_params, check_fields
from server.text_check import check_text

router = APIRouter()

# The chat pipeline's errors name chat's fields; these are their Responses API names.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


@router.post("/v1/responses", response_model=ResponseObject)
async def create_response(body: ResponsesRequest, request: Request):
    state = request.app.state
    engine = state.engine_holder.get()
    model = state.engine_holder.check_model(body.model)
    check_fields(body)
    if body.truncation not in (None, "disabled"):
        raise bad_request(f"truncation {body.truncation!r} is not supported; only 'disabled' is.", param="truncation")
    check_text(body)
    store = store_of(request.app)
    items = list(body.input)
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        items = previous.input_items + as_input_items(previous.response.output) + items
    with _responses_params():
        chat = chat_request(body, items)
        plan = plan_tools(chat, getattr(engine.tokenizer, "chat_template", None), state.settings.tool_call_parser)
        structured = _constraint(body, plan)
        chars = chat.num_content_chars
        check_prompt_chars(engine.tokenizer, chars, engine.info.max_model_len, "input")
        prompt_ids = await run_sized(
            chars + len(chat.messages), render_chat, engine.tokenizer, chat.messages, plan.prompt_tools
        )
        params = build_sampling_params(chat, chat.requested_max_tokens, None, len(prompt_ids), engine.info, structured)
    generation = Generation(engine, state.metrics, model, engine_request_id(request), [(prompt_ids, params)], [])
    response_id = f"resp_{uuid.uuid4().hex}"
    created_at = int(time.time())
    builder = OutputBuilder()
    reader = output_reader(plan)

    def snapshot(status: str, usage: Usage | None = None) -> ResponseObject:
        incomplete = ResponsesIncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        return ResponseObject(
            id=response_id,
            created_at=created_at,
            status=status,
            model=model,
            output=builder.items,
            incomplete_details=incomplete,
            usage=_usage(usage) if usage else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            tools=body.tools,
            tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
            parallel_tool_calls=body.parallel_tool_calls,
            text=body.text,
            previous_response_id=body.previous_response_id,
            store=body.store,
            metadata=body.metadata or {},
            user=body.user,
        )

    def finish(finish_reason: str) -> tuple[ResponseObject, list[dict]]:
        status: Literal["completed", "incomplete"] = "incomplete" if finish_reason == "length" else "completed"
        events = builder.finish(status)
        response = snapshot(status, generation.usage())
        if body.store:
            store.put(StoredResponse(items, response))
        return response, events

    def make_response(results) -> ResponseObject:
        builder.feed(reader.feed(results[0].text) + reader.finish())
        return finish(results[0].finish_reason)[0]

    async def make_events():
        for kind in ("response.created", "response.in_progress"):
            yield {"type": kind, "response": snapshot("in_progress").model_dump(by_alias=True)}
        async for deltas in generation:
            for delta in deltas:
                for event in builder.feed(reader.feed(delta.text) + (reader.finish() if delta.finish_reason else [])):
                    yield event
                if delta.finish_reason:
                    response, events = finish(delta.finish_reason)
                    for event in events:
                        yield event
                    # response.incomplete when max_output_tokens cut the output short, as OpenAI sends it
                    yield {"type": f"response.{response.status}", "response": response.model_dump(by_alias=True)}

    if body.stream:
        return await stream_response(request, generation, make_events())
    return await respond(request, generation, False, make_response, make_events)


@contextmanager
def _responses_params():
    try:
        yield
    except APIError as exc:
        if exc.param is not None:
            exc.param = _PARAMS.get(exc.param, exc.param)
        raise


def _constraint(body: ResponsesRequest, plan: ToolPlan):
    """The output's one constraint: text.format's, or the tool choice's."""
    requested = text_constraint(body.text.format)
    if requested is not None and plan.structured is not None:
        raise bad_request(
            f"tool_choice {plan.mode} constrains the output itself; it cannot be combined with a "
            f"text.format of type {body.text.format.type}.",
            param="tool_choice",
        )
    return requested or plan.structured


def _usage(usage: Usage) -> ResponsesUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponsesUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        input_tokens_details=ResponsesInputTokensDetails(cached_tokens=cached),
    )
