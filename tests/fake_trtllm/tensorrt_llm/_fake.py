"""The fake's recorder and knobs (see tensorrt_llm/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

CALLS: list[tuple] = []


@dataclass
class Knobs:
    script: list[int] | None = None  # tokens every output generates, in order (None: a deterministic walk)
    tokens_per_step: int = 1  # tokens each streamed RequestOutput adds per output
    # iteration stats records the executor reports, one per generation step (executor/result.py here)
    stats: list[dict] = field(default_factory=list)
    step_seconds: float = 0.0  # how long each streamed RequestOutput takes, the first one included
    # The two ways a streamed result fails in TensorRT-LLM (executor/executor.py
    # GenerationExecutor._handle_background_error): an error response for one request is raised as RequestError
    # and the executor goes on; any other error shuts the executor down first, then is raised.
    fail_request: str | None = None  # the next generation step raises RequestError(this), for that request only
    fail_generation: str | None = None  # the next generation step raises RuntimeError(this) and the LLM is shut down
    gpus: int = 1  # what torch.cuda.device_count() says: llmapi/llm.py BaseLLM.__init__ checks a split against it


FAKE = Knobs()


def reset() -> None:
    CALLS.clear()
    FAKE.__init__()


class Recorded:
    """A config object: keyword arguments only, and only the real class's field names."""

    FIELDS: frozenset[str] = frozenset()

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)
        CALLS.append((type(self).__name__, dict(kwargs)))

    def model_dump(self, exclude_unset: bool = True) -> dict:
        return dict(self.kwargs)

    def __eq__(self, other):
        return type(self) is type(other) and self.kwargs == other.kwargs

    def __repr__(self):
        return f"{type(self).__name__}({self.kwargs})"
