"""kiln's TensorRT-LLM backend: `kiln build --backend trtllm` compiles a TensorRT engine through
TensorRT-LLM's LLM API, and `TrtllmEngine` serves it behind kiln's `Engine` interface.

Written against TensorRT-LLM's documented 1.x LLM API (`tensorrt_llm._tensorrt_engine.LLM`, the
TensorRT-engine flavour of `LLM`, and `tensorrt_llm.llmapi`). `tensorrt_llm` cannot be installed on
kiln's CPU machines, so nothing here imports it at module load: `api.load()` does, when a build or an
engine needs it, and says in one sentence what is missing otherwise. Tests drive this package with a
recording fake of the module (tests/fake_trtllm)."""
