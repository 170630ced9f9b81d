"""The tool-call parsers by name, and which one a chat template's model writes."""

from __future__ import annotations

from server.tools.hermes import HermesParser
from server.tools.llama3_json import Llama3JsonParser
from server.tools.mistral import MistralParser
from server.tools.tool_parser import ToolParser

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)
}

# A template that renders a format's markers (or, for Llama 3, its "ipython" tool role) teaches the model to
# write that format. First match wins.
_TEMPLATE_MARKERS = (
    ("<tool_call>", HermesParser.name),
    ("[TOOL_CALLS]", MistralParser.name),
    ("<|python_tag|>", Llama3JsonParser.name),
    ("ipython", Llama3JsonParser.name),
)


def parser_for_template(chat_template: str | None) -> str | None:
    """The name of the parser for the model with this chat template's source, None if its format is unknown."""
    return next((name for marker, name in _TEMPLATE_MARKERS if marker in (chat_template or "")), None)
