"""Fake tensorrt_llm.sampling_params.GuidedDecodingParams, field for field the 1.0 class
(tensorrt_llm/sampling_params.py):
a slots, keyword-only dataclass whose `_validate()` allows at most one truthy guide. The real class does not validate
itself: `SamplingParams.__post_init__` -> `SamplingParams._validate` calls it, so a request with two guides fails
when its SamplingParams is built (the fake SamplingParams in llmapi does the same)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    json: Any | None = None  # str, dict or a pydantic model; a dict is json.dumps'ed for the executor
    regex: str | None = None
    grammar: str | None = None  # EBNF (xgrammar's dialect)
    json_object: bool = False
    structural_tag: str | None = None  # PyTorch backend only: the TensorRT engine's GuidedDecoder ignores it

    def _validate(self):
        num_guides = sum(bool(getattr(self, f.name)) for f in fields(self))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


def guide_for_executor(guided: GuidedDecodingParams | None) -> tuple[str, Any] | None:
    """(GuideType, guide) as `SamplingParams._get_guided_decoding_params` hands it to the C++ executor: json_object
    first, then the first guide that is not None; a dict schema becomes JSON text."""
    import json

    if guided is None:
        return None
    if guided.json_object:
        return ("JSON", None)
    for name, guide_type in (
        ("json", "JSON_SCHEMA"),
        ("regex", "REGEX"),
        ("grammar", "EBNF_GRAMMAR"),
        ("structural_tag", "STRUCTURAL_TAG"),
    ):
        value = getattr(guided, name)
        if value is not None:
            return (guide_type, json.dumps(value) if isinstance(value, dict) else value)
    return None
