"""Refuse request text that is not valid Unicode before it reaches a tokenizer or a chat template.

JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python keeps it in the str, and the first UTF-8
encode (the tokenizer's) fails deep inside a request. One walk over the parsed body finds it and names
the field instead.
"""

from __future__ import annotations

from pydantic import BaseModel

from server.errors import APIError, bad_request


def _first_invalid(value, path: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, BaseModel):
        return next(
            (
                bad
                for name in type(value).model_fields
                if (bad := _first_invalid(getattr(value, name), f"{path}.{name}" if path else name))
            ),
            None,
        )
    if isinstance(value, (list, tuple)):
        return next((bad for i, item in enumerate(value) if (bad := _first_invalid(item, f"{path}.{i}"))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            bad = _first_invalid(key, f"{path}.{key!r}") or _first_invalid(item, f"{path}.{key!r}")
            if bad:
                return bad
    return None


def check_text(body: BaseModel) -> None:
    """400 naming the first field whose text holds a lone surrogate (not encodable as UTF-8)."""
    path = _first_invalid(body, "")
    if path is not None:
        raise invalid_text(path)


def invalid_text(path: str) -> APIError:
    return bad_request(
        f"Invalid value for '{path}': the text is not valid Unicode (it contains a lone UTF-16 "
        "surrogate such as \\ud800).",
        param=path,
    )
