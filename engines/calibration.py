"""Chat-request sets for `kiln build`: the calibration set and the held-out evaluation set.

Quantizers (AWQ, GPTQ, SmoothQuant, FP8 and INT8 KV-cache scales) collect activation statistics
on calibration prompts; the build then measures each quantized model against the unquantized one
on a separate evaluation set, so the accuracy loss is not measured on the data it was fitted to.
Both ship as JSONL in build/calibration, one chat request a line, in the OpenAI chat request shape
(`{"messages": [...]}`, extra keys such as "model" ignored) or as `{"prompt": "text"}`.

Every problem with a file raises `CalibrationDataError` with one sentence naming the file and line,
since users may point the build at a file of their own traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from engines.data_files import data_dir

CALIBRATION_DIR = data_dir("calibration")
CALIBRATION_FILE = "calib.jsonl"
EVAL_FILE = "eval.jsonl"

MIN_SAMPLES = 16  # fewer gives activation ranges too noisy to set scales from
MAX_SAMPLES = 4096  # more only costs build time: the statistics have long converged
DEFAULT_SAMPLES = 512

ROLES = ("system", "user", "assistant")

Message = dict[str, str]


class CalibrationDataError(ValueError):
    """A chat-request file is missing, unreadable or malformed, or a sample count is out of range."""


def calibration_dir() -> Path:
    return Path(os.environ.get("KILN_CALIBRATION_DIR", CALIBRATION_DIR))


def default_calibration_path() -> Path:
    return calibration_dir() / CALIBRATION_FILE


def default_eval_path() -> Path:
    return calibration_dir() / EVAL_FILE


def load_chat_requests(path: str | Path) -> list[list[Message]]:
    """Each request's messages list, in file order; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationDataError(f"Chat-request file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"Chat-request file {path} could not be read: {exc}.") from None
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            requests.append(_parse_request(line, f"{path} line {number}"))
    if not requests:
        raise CalibrationDataError(f"Chat-request file {path} holds no requests.")
    return requests


def _parse_request(line: str, where: str) -> list[Message]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibrationDataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}).") from None
    if not isinstance(record, dict):
        raise CalibrationDataError(f"{where} is a JSON {type(record).__name__}, not an object.")
    if "messages" in record:
        return _parse_messages(record["messages"], where)
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise CalibrationDataError(f'{where} has a "prompt" that is not a non-empty string.')
        return [{"role": "user", "content": prompt}]
    raise CalibrationDataError(f'{where} has neither "messages" nor "prompt".')


def _parse_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise CalibrationDataError(f'{where} has "messages" that is not a non-empty list.')
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise CalibrationDataError(f"{where}: message {index} is not an object.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise CalibrationDataError(f"{where}: message {index} has role {role!r}, not one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise CalibrationDataError(f'{where}: message {index} has no string "content".')
        # Keep only role and content: other keys (name, tool calls) do not reach the chat template.
        parsed.append({"role": role, "content": content})
    return parsed


def select_samples(requests: list, n: int, seed: int = 0) -> list:
    """A deterministic subset of `n` requests in file order; all of them when the file has fewer."""
    if not MIN_SAMPLES <= n <= MAX_SAMPLES:
        raise CalibrationDataError(f"--calib-samples must be between {MIN_SAMPLES} and {MAX_SAMPLES}, got {n}.")
    if len(requests) <= n:
        return list(requests)
    # Sample indices rather than items so the subset keeps file order (stable across Python versions).
    chosen = sorted(random.Random(seed).sample(range(len(requests)), n))
    return [requests[i] for i in chosen]


def render_prompts(requests: list[list[Message]], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Token ids of each request through the model's chat template, cut to the first `max_tokens`."""
    prompts = []
    for messages in requests:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Newer transformers return a BatchEncoding (a dict) rather than a bare list.
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        prompts.append(list(ids)[:max_tokens])
    return prompts


def fingerprint(requests: list[list[Message]]) -> str:
    """sha256 of the selected requests, so the build's content hash changes when the data does."""
    canonical = json.dumps(requests, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
