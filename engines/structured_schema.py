"""Which JSON Schema keywords a constrained request may use: those the grammar (xgrammar, in both backends)
enforces. xgrammar compiles some keywords it does not enforce (uniqueItems, dependentRequired, allOf, oneOf
without types, unknown formats, a length next to a pattern...): an output could then break the schema, so they
are refused by name.
"""

from __future__ import annotations

from typing import Any

# Enforced by xgrammar's JSON-schema converter (each checked against accepted / refused instances).
ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "unevaluatedProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "propertyNames",
        "format",
    }
)
# Say nothing about valid instances.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
    }
)
FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
# Keywords whose value is a schema, a list of schemas, or a name -> schema map.
_SCHEMA = ("additionalProperties", "unevaluatedProperties", "items", "propertyNames")
_SCHEMA_LISTS = ("prefixItems", "anyOf")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
MAX_DEPTH = 64


def check_json_schema(schema: Any, path: str = "schema", depth: int = 0) -> None:
    """Raise ValueError (one sentence naming the keyword and where it is) unless the schema uses only
    keywords the grammar enforces."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path} must be a JSON object (a JSON schema), got {type(schema).__name__}.")
    if depth > MAX_DEPTH:
        raise ValueError(f"The JSON schema is nested deeper than {MAX_DEPTH} levels.")
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            raise ValueError(f"The JSON schema keyword {key!r} (at {where}) is not supported for structured outputs.")
        if key in ("minLength", "maxLength") and "pattern" in schema:
            raise ValueError(
                f"{where}: {key} next to a pattern is not enforced for structured outputs; put the "
                "length in the pattern instead."
            )
        if key == "format" and value not in FORMATS:
            raise ValueError(
                f"The JSON schema format {value!r} (at {where}) is not supported for structured "
                f"outputs; supported: {', '.join(sorted(FORMATS))}."
            )
        if key in _SCHEMA and isinstance(value, (dict, bool)):
            check_json_schema(value, where, depth + 1)
        elif key == "items" and isinstance(value, list):
            raise ValueError(f"{where}: a list of item schemas is not supported; use prefixItems.")
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list):
                raise ValueError(f"{where} must be a list of schemas.")
            for i, sub in enumerate(value):
                check_json_schema(sub, f"{where}[{i}]", depth + 1)
        elif key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise ValueError(f"{where} must be an object mapping names to schemas.")
            for name, sub in value.items():
                check_json_schema(sub, f"{where}.{name}", depth + 1)
