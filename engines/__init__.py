"""Everything below HTTP: the Engine interface, backends, model loading."""

from engines.base import Engine
from engines.config import EngineConfig


def create_engine(config: EngineConfig) -> Engine:
    """Build the engine a config asks for, loading its weights: the TensorRT-LLM backend for an engine
    directory `kiln build --backend trtllm` wrote, kiln's torch backend otherwise."""
    if select_backend(config) == "trtllm":
        from engines.trtllm.engine import TrtllmEngine

        return TrtllmEngine.from_config(config)
    if (config.tensor_parallel_size or 1) > 1 or (config.pipeline_parallel_size or 1) > 1:
        from engines.parallel import TORCH_REFUSAL

        raise ValueError(TORCH_REFUSAL)
    from engines.torch.engine import AsyncTorchEngine

    return AsyncTorchEngine.from_config(config)


def select_backend(config: EngineConfig) -> str:
    """The backend an engine directory was built for; --backend may only confirm it (one sentence otherwise).
    Whether tensorrt_llm imports and a GPU is visible is checked when the trtllm engine loads."""
    built_for = "torch"
    if config.engine_dir is not None:
        from engines.build import manifest as mf

        if mf.is_engine_dir(config.engine_dir):
            built_for = mf.load_manifest(config.engine_dir, verify=False).backend
    if config.backend in ("auto", built_for):
        return built_for
    if built_for == "trtllm":
        raise ValueError(f"{config.engine_dir} holds a TensorRT-LLM engine; serve it with --backend trtllm (or auto).")
    raise ValueError(
        "--backend trtllm serves engine directories built with `kiln build --backend trtllm`; "
        f"{config.engine_dir or 'a model folder'} is not one."
    )
