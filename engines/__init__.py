"""Everything below HTTP: the Engine interface, backends, model loading."""

from engines.base import Engine
from engines.config import EngineConfig


def create_engine(config: EngineConfig) -> Engine:
    """Build the engine a config asks for (the torch backend for now), loading its weights."""
    from engines.torch.engine import AsyncTorchEngine

    return AsyncTorchEngine.from_config(config)
