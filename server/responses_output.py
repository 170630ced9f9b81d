"""A response's output items, built from one choice's content and tool-call events (server/chat_tools.py's
readers). The same builder serves both ways of answering: a stream sends the events it returns as they come,
a JSON response keeps only its items, so the two always agree."""

from __future__ import annotations

import uuid
from typing import Literal, cast

from server.protocol import (
    ResponsesFunctionCallItem,
    ResponsesInputItem,
    ResponsesInputText,
    ResponsesMessageItem,
    ResponsesOutputFunctionCall,
    ResponsesOutputItem,
    ResponsesOutputMessage,
    ResponsesOutputText,
)
from server.tools.events import ContentDelta, StreamEvent


class OutputBuilder:
    """One message item (all the content, as chat's one message has) and a function_call item per tool call, in
    the order they start. feed() and finish() return the stream events (each a dict without sequence_number)."""

    def __init__(self):
        self.items: list[ResponsesOutputItem] = []
        self._message: int | None = None  # the message item's output index
        self._calls: dict[int, int] = {}  # a tool call's index -> its item's output index

    def feed(self, events: list[StreamEvent]) -> list[dict]:
        out: list[dict] = []
        for e in events:
            if isinstance(e, ContentDelta):
                if e.text:
                    index = self._open_message(out)
                    message = cast(ResponsesOutputMessage, self.items[index])  # _open_message's index is the message's
                    message.content[0].text += e.text
                    out.append(
                        _at(
                            message,
                            index,
                            "response.output_text.delta",
                            content_index=0,
                            delta=e.text,
                            logprobs=[],
                        )
                    )
                continue
            if e.id is not None:  # a call's first event
                item = ResponsesOutputFunctionCall(id=f"fc_{uuid.uuid4().hex}", call_id=e.id, name=e.name)
                self._calls[e.index] = self._add(item, out)
            index = self._calls[e.index]
            if e.arguments:
                call = cast(ResponsesOutputFunctionCall, self.items[index])  # _calls holds function_call items only
                call.arguments += e.arguments
                out.append(_at(call, index, "response.function_call_arguments.delta", delta=e.arguments))
        return out

    def finish(self, status: Literal["completed", "incomplete"]) -> list[dict]:
        """Close every item with `status` ("completed" or "incomplete"). An output without any text or call is
        one empty message, so that there is always an output_text to read."""
        out: list[dict] = []
        if not self.items:
            self._open_message(out)
        for index, item in enumerate(self.items):
            item.status = status
            if isinstance(item, ResponsesOutputMessage):
                part = item.content[0]
                out.append(_at(item, index, "response.output_text.done", content_index=0, text=part.text, logprobs=[]))
                out.append(_at(item, index, "response.content_part.done", content_index=0, part=part.model_dump()))
            else:
                out.append(
                    _at(item, index, "response.function_call_arguments.done", name=item.name, arguments=item.arguments)
                )
            out.append({"type": "response.output_item.done", "output_index": index, "item": item.model_dump()})
        return out

    def _open_message(self, out: list[dict]) -> int:
        if self._message is None:
            message = ResponsesOutputMessage(id=f"msg_{uuid.uuid4().hex}")
            self._message = self._add(message, out)
            message.content.append(ResponsesOutputText())
            out.append(
                _at(
                    message,
                    self._message,
                    "response.content_part.added",
                    content_index=0,
                    part=message.content[0].model_dump(),
                )
            )
        return self._message

    def _add(self, item: ResponsesOutputItem, out: list[dict]) -> int:
        self.items.append(item)
        out.append(
            {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": item.model_dump()}
        )
        return len(self.items) - 1


def _at(item: ResponsesOutputItem, index: int, kind: str, **fields) -> dict:
    return {"type": kind, "item_id": item.id, "output_index": index, **fields}


def as_input_items(output: list[ResponsesOutputItem]) -> list[ResponsesInputItem]:
    """A response's output as the input items of its continuation."""
    items: list[ResponsesInputItem] = []
    for item in output:
        if isinstance(item, ResponsesOutputMessage):
            parts = [ResponsesInputText(type="output_text", text=part.text) for part in item.content]
            items.append(ResponsesMessageItem(role="assistant", content=parts))
        else:
            items.append(
                ResponsesFunctionCallItem(
                    type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments
                )
            )
    return items
