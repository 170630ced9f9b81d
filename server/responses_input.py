"""A Responses API request as the chat request the chat pipeline runs: its input items as chat messages, its
flat function tools as chat tools, and its text.format as the output's structured-output constraint."""

from __future__ import annotations

from engines.base import StructuredOutput
from server.errors import bad_request
from server.protocol import (
    MAX_MESSAGES,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    NamedToolChoice,
    NamedToolChoiceFunction,
    ResponsesFunctionCallItem,
    ResponsesFunctionCallOutputItem,
    ResponsesInputItem,
    ResponsesMessageItem,
    ResponsesNamedToolChoice,
    ResponsesRequest,
    ResponsesTextFormat,
    Tool,
    ToolCall,
    ToolChoice,
)
from server.structured import json_schema_output


def chat_request(body: ResponsesRequest, items: list[ResponsesInputItem]) -> ChatCompletionRequest:
    """`items`: the whole conversation (a previous response's input and output, then this request's input)."""
    messages = [ChatMessage(role="system", content=body.instructions)] if body.instructions is not None else []
    messages += _messages(items)
    if not messages:
        raise bad_request("input must hold at least one item.", param="input")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(
            f"The conversation has {len(messages)} messages, more than the {MAX_MESSAGES} allowed.", param="input"
        )
    choice: ToolChoice | None
    if isinstance(body.tool_choice, ResponsesNamedToolChoice):
        choice = NamedToolChoice(type="function", function=NamedToolChoiceFunction(name=body.tool_choice.name))
    else:
        choice = body.tool_choice
    tools = [
        Tool(
            type="function",
            function=FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in body.tools
    ]
    return ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools or None,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
    )


def _messages(items: list[ResponsesInputItem]) -> list[ChatMessage]:
    """Consecutive function calls (and the assistant text before them) make one assistant message, as in chat."""
    messages: list[ChatMessage] = []
    names = {item.call_id: item.name for item in items if isinstance(item, ResponsesFunctionCallItem)}
    for item in items:
        if isinstance(item, ResponsesMessageItem):
            messages.append(ChatMessage(role=item.role, content=item.text()))
        elif isinstance(item, ResponsesFunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if not messages or messages[-1].role != "assistant":
                messages.append(ChatMessage(role="assistant", tool_calls=[]))
            messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
        else:
            assert isinstance(item, ResponsesFunctionCallOutputItem)
            messages.append(
                ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id, name=names.get(item.call_id))
            )
    return messages


def text_constraint(fmt: ResponsesTextFormat) -> StructuredOutput | None:
    """text.format as the output's constraint (None: plain text)."""
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise bad_request("text.format of type json_schema needs a schema.", param="text.format.schema")
        return json_schema_output(fmt.schema_, "text.format.schema")
    return None
