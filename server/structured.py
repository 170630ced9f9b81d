"""A request's structured-output fields (OpenAI's response_format, vLLM's structured_outputs and guided_*) as
the engine's one `StructuredOutput` constraint."""

from __future__ import annotations

import json
from typing import Any

from engines.base import StructuredKind, StructuredOutput
from server.errors import bad_request
from server.protocol import SamplingFields

_GUIDED_KINDS: tuple[StructuredKind, ...] = ("json", "regex", "choice", "grammar")  # the guided_* fields


def structured_output(body: SamplingFields) -> StructuredOutput | None:
    """The constraint the request asks for, or None; 400 when it asks for more than one."""
    found: list[tuple[str, StructuredOutput]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request(
                "response_format of type json_schema needs a json_schema object.", param="response_format.json_schema"
            )
        found.append(("response_format", _json(fmt.json_schema.schema_, "response_format.json_schema.schema")))
    if body.structured_outputs is not None:
        so = body.structured_outputs
        given: tuple[tuple[StructuredKind, Any], ...] = (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object or None),
        )
        kinds = [(name, value) for name, value in given if value is not None]
        if len(kinds) != 1:
            raise bad_request(
                f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; got {len(kinds)}.",
                param="structured_outputs",
            )
        name, value = kinds[0]
        found.append(("structured_outputs", _spec(name, value, f"structured_outputs.{name}")))
    for name in _GUIDED_KINDS:
        value = getattr(body, f"guided_{name}")
        if value is not None:
            found.append((f"guided_{name}", _spec(name, value, f"guided_{name}")))
    if len(found) > 1:
        raise bad_request(
            f"Only one structured-output field may be given; got {', '.join(n for n, _ in found)}.", param=found[1][0]
        )
    return found[0][1] if found else None


def json_schema_output(schema: Any, param: str) -> StructuredOutput:
    return _json(schema, param)


def _spec(kind: StructuredKind, value: Any, param: str) -> StructuredOutput:
    if kind == "json":
        return _json(value, param)
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "choice":
        if not value:
            raise bad_request(f"{param} must list at least one string.", param=param)
        return StructuredOutput("choice", choices=tuple(value))
    if not value:
        raise bad_request(f"{param} must not be empty.", param=param)
    return StructuredOutput(kind, value)


def _json(schema: Any, param: str) -> StructuredOutput:
    """A JSON schema given as an object or as JSON text, kept as text in the client's property order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}.", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema object.", param=param)
    return StructuredOutput("json", json.dumps(schema, ensure_ascii=False))
