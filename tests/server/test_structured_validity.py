"""Validity: every output constrained by one of the 57 schemas of tests/structured_schemas.py parses and validates
with jsonschema, at temperature 0 and 1, as a json_schema response_format and as a named tool's arguments,
on the live server with the default model (all 228 requests in flight together)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from tests.structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow

MAX_TOKENS = 1000  # far above what any of the bounded schemas needs: an output cut short is a failure
CONCURRENCY = 32


async def _json_schema(client, model, name, schema, temperature):
    completion = await client.chat.completions.create(
        model=model,
        temperature=temperature,
        seed=0,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": f"Produce a JSON document for '{name}'."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
    )
    choice = completion.choices[0]
    return choice.finish_reason == "stop", choice.message.content


async def _named_tool(client, model, name, schema, temperature):
    tool = {"type": "function", "function": {"name": name, "description": f"Records a {name}.", "parameters": schema}}
    completion = await client.chat.completions.create(
        model=model,
        temperature=temperature,
        seed=0,
        max_tokens=MAX_TOKENS,
        tools=[tool],
        messages=[{"role": "user", "content": f"Record a {name}."}],
        tool_choice={"type": "function", "function": {"name": name}},
    )
    choice = completion.choices[0]
    [call] = choice.message.tool_calls
    return choice.finish_reason == "tool_calls" and call.function.name == name, call.function.arguments


def test_every_schema_is_met(async_openai_factory, model_name):
    async def run():
        client = async_openai_factory()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(kind, name, schema, temperature):
            async with gate:
                finished, text = await kind(client, model_name, name, schema, temperature)
            try:
                jsonschema.validate(json.loads(text), schema)
                valid = finished
            except (ValueError, jsonschema.ValidationError):
                valid = False
            return (kind.__name__, name, temperature), valid, text

        cases = [
            one(kind, name, schema, t)
            for kind in (_json_schema, _named_tool)
            for name, schema in SCHEMAS
            for t in (0.0, 1.0)
        ]
        return await asyncio.gather(*cases)

    results = asyncio.run(run())
    assert len(SCHEMAS) >= 50 and len(results) == 4 * len(SCHEMAS)
    failures = [(case, text) for case, valid, text in results if not valid]
    assert not failures, f"{len(failures)} of {len(results)} outputs are invalid: {failures[:3]}"
