"""The responses that `previous_response_id` may continue: the last MAX_STORED_RESPONSES stored ones, in memory.

Each entry holds its response's whole conversation (input items, the previous responses' included, and its
output items), so a continuation needs one lookup, and the bound on entries bounds the memory. The least
recently stored or continued response goes first; a restart forgets them all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.errors import APIError
from server.protocol import ResponseObject, ResponsesInputItem

MAX_STORED_RESPONSES = 1000


@dataclass(frozen=True)
class StoredResponse:
    input_items: list[ResponsesInputItem]  # without the instructions, which a continuation does not inherit
    response: ResponseObject


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, entry: StoredResponse) -> None:
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        """404 in OpenAI's shape for an id never stored, not stored (store: false) or evicted."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise APIError(
                404,
                f"Previous response with id '{response_id}' not found.",
                "invalid_request_error",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        self._entries.move_to_end(response_id)
        return entry


def store_of(app) -> ResponseStore:
    """The app's store, made on first use so that the app factory needs no line for it."""
    store = getattr(app.state, "responses_store", None)
    if store is None:
        store = app.state.responses_store = ResponseStore()
    return store
