"""Fake tensorrt_llm.executor: RequestError, defined in tensorrt_llm/executor/utils.py and re-exported here."""


class RequestError(RuntimeError):
    """One request failed (its error response from the executor); the LLM goes on serving the others.
    GenerationExecutor._handle_background_error raises it for an error string from the C++ executor."""
