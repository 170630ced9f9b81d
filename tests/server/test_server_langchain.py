"""LangChain's ChatOpenAI (the real langchain-openai package) against the live server: with_structured_output
returns a validated pydantic object, bind_tools returns tool calls whose arguments follow the tool's schema."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

langchain_openai = pytest.importorskip("langchain_openai")


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: float = Field(ge=0, le=50)


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=30)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


@pytest.fixture
def chat(live_server, model_name):
    return langchain_openai.ChatOpenAI(
        base_url=f"{live_server.base_url}/v1",
        api_key=live_server.api_key,
        model=model_name,
        temperature=0,
        max_tokens=120,
    )


PROMPT = "Name a large city as JSON with the keys name, country and population_millions."


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, method):
    city = chat.with_structured_output(City, method=method).invoke(PROMPT)
    assert isinstance(city, City)
    assert city.name and city.country


def test_with_structured_output_json_mode(chat):
    """json_mode promises a JSON object, not the schema (as OpenAI's): LangChain parses it without validating."""
    value = chat.with_structured_output(City.model_json_schema(), method="json_mode").invoke(PROMPT)
    assert isinstance(value, dict)


def test_bind_tools(chat):
    message = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    assert call["id"].startswith("call_")


def test_bind_tools_required_and_a_round_trip(chat):
    from langchain_core.messages import HumanMessage, ToolMessage

    question = HumanMessage("What is the weather in Paris?")
    ai = chat.bind_tools([GetWeather], tool_choice="any").invoke([question])
    assert ai.tool_calls
    results = [ToolMessage("Sunny, 24 degrees.", tool_call_id=call["id"]) for call in ai.tool_calls]
    answer = chat.bind_tools([GetWeather]).invoke([question, ai, *results], tool_choice="none")
    assert isinstance(answer.content, str) and answer.content
