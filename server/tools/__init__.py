"""OpenAI tool calling, as pure text handling the chat route builds on.

- `registry`: which parser reads a model's own tool-call format (`hermes`, `llama3_json`, `mistral`), picked
  from its chat template; each parser reads a whole output (`parse`) or one streamed a delta at a time.
- `fallback_prompt`: tools for chat templates that know nothing of them, spelled out as Hermes-format text.
- `required_stream`: the JSON array of calls that `tool_choice: "required"` constrains the output to.
"""
