"""Property-based fuzzing of the HTTP API with schemathesis against a live `kiln serve` with the default model.

Every operation of the server's own /openapi.json gets schema-valid and schema-violating requests, one in
four of them without the API key. No response may be a 5xx, every 4xx must be an OpenAI error envelope, and
afterwards the server must still answer a normal request. Failures are collected instead of raised, so that
one run reports every distinct failure (and the request the engine died on, if it did) instead of stopping,
and shrinking, at the first one.

The cases come from schemathesis' Python API (APIOperation.as_strategy) under our own Hypothesis `given`:
schemathesis' pytest integration (`schema.parametrize`) does not run under this pytest (it sets
`Node._nodeid`, which pytest 9.2 no longer has).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY, CLEAN_EXIT, LOAD_TIMEOUT_S, start_server

pytestmark = pytest.mark.fuzz

MAX_MODEL_LEN = 512
# Per operation; operations without inputs (most GETs) are exhausted after a few cases, the chat and completions
# bodies and /v1/models/{model_id} make up the total (about 1,200 cases, a minute on two idle cores).
MAX_EXAMPLES = 400
# Bounds the run on a slow or busy machine: cases generated after it is spent are not sent.
BUDGET_S = 300
# Generation dominates a case's time on a CPU, so a case generates at most this many tokens (see bound_generation).
MAX_NEW_TOKENS = 2
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("fuzz"), "--max-model-len", str(MAX_MODEL_LEN), api_key=API_KEY)
    try:
        # The first generation compiles kiln's CPU kernels unless they are cached: not within a case's timeout.
        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=LOAD_TIMEOUT_S) as client:
            warm_up = say_hi(client)
        assert warm_up.status_code == 200, warm_up.text
        yield server
    finally:
        code = server.stop()
    assert code in CLEAN_EXIT, f"kiln serve exited with {code} after SIGTERM:\n{server.log()}"


def say_hi(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})


def describe(request: requests.PreparedRequest) -> str:
    """The request as sent: method, path and query, whether it had the key, and the body's exact bytes."""
    body = request.body or b""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "backslashreplace")
    key = "with" if "Authorization" in request.headers else "without"
    return f"{request.method} {request.path_url} ({key} API key) {body}"


def problem_with(status: int, content: bytes) -> str | None:
    """Why a response breaks the rules (no 5xx; a 4xx is exactly an OpenAI error envelope), or None."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if status >= 500:
        kind = f" {error.get('code') or error.get('type')}" if isinstance(error, dict) else ""
        return f"HTTP {status}{kind}"
    if status < 400:
        return None
    if not isinstance(error, dict) or set(body) != {"error"}:
        return f"HTTP {status} without an error envelope: {content[:200]!r}"
    if set(error) != {"message", "type", "param", "code"}:
        return f"HTTP {status} error has the keys {sorted(error)}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"HTTP {status} error has no message or type: {error}"
    return None


def bound_generation(body) -> None:
    """Make a body ask for at most MAX_NEW_TOKENS new tokens where the server would accept more (a missing
    max_tokens means the rest of the context); values it must reject are sent as generated."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and MAX_NEW_TOKENS < value <= MAX_MODEL_LEN:
            body[key] = MAX_NEW_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_NEW_TOKENS


def test_fuzz_api(server, capsys):
    config = schemathesis.Config.from_dict({"base-url": server.base_url})
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=server.headers, config=config)
    deadline = time.monotonic() + BUDGET_S
    cases = unsent = 0
    failures = Counter()  # (operation, problem) -> failing requests
    reproducers = {}  # (operation, problem) -> the first failing request
    engine_death = None
    last_request = ""

    def send(case, with_key: bool) -> None:
        nonlocal cases, unsent, engine_death, last_request
        if time.monotonic() > deadline:
            unsent += 1
            return
        cases += 1
        bound_generation(case.body)
        try:
            response = case.call(headers=server.headers if with_key else {}, timeout=REQUEST_TIMEOUT_S)
            request, status = response.request, response.status_code
            problem = problem_with(status, response.content)
        except (requests.ConnectionError, requests.Timeout) as exc:  # a hang or a dead server is a failure too
            request, status, problem = exc.request, "no response", f"no response: {type(exc).__name__}"
        sent = f"{describe(request)} -> {status}"
        if problem and "engine_dead" in problem and engine_death is None:
            # Requests are sequential: the engine died on this request or on the one before it.
            engine_death = f"the request before the first engine_dead: {last_request}\n  the first: {sent}"
        last_request = sent
        if problem:
            failures[case.operation.label, problem] += 1
            reproducers.setdefault((case.operation.label, problem), sent)

    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative cases of an operation without inputs do not exist; one_of then draws only positive ones.
        strategy = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode))
        with_key = st.sampled_from((True, True, True, False))
        # No deadline or health checks: every case is an HTTP request, and negative generation filters a lot.
        run = settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )(given(strategy, with_key)(send))
        run()

    budget = f"; {unsent} more not sent, the {BUDGET_S} s budget ran out" if unsent else ""
    report = [f"fuzz: {cases} cases, {failures.total()} failures ({len(failures)} distinct){budget}"]
    report += [
        f"{operation}: {problem} (x{count})\n  e.g. {reproducers[operation, problem]}"
        for (operation, problem), count in failures.items()
    ]
    if engine_death:
        report.append(f"the engine died; {engine_death}")
    report.append(f"server log: {server.log_path}")
    with capsys.disabled():  # the summary shows in CI's log whether the test passes or not
        print("\n" + "\n".join(report))
    assert cases > 0, "no case ran"
    assert not failures, "\n".join(report)
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=REQUEST_TIMEOUT_S) as client:
        live = client.get("/v1/health/live")
        assert live.status_code == 200, live.text
        chat = say_hi(client)
        assert chat.status_code == 200 and len(chat.json()["choices"]) == 1, chat.text
