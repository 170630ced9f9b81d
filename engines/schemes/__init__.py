"""The registry of quantization schemes: `--precision` name -> Scheme (engines/schemes/base.py).

Every module that needs something about a precision (profiles, planning, the build's calibration and
quantization, the manifest's hardware requirement, the TensorRT-LLM adapter) looks its scheme up here
instead of keeping a table of names. Adding a precision = one module defining a Scheme subclass, one
`register` call below, and a TOML profile under build/profiles/ for `--precision auto` to pick it.
"""

from __future__ import annotations

from engines.schemes.base import CALIBRATION_STATISTICS, LayerResult, QuantizeContext, Scheme, TrtllmMapping
from engines.schemes.dense import Bf16, Fp32
from engines.schemes.fp8 import Fp8
from engines.schemes.int4 import Int4Awq, Int4Gptq, Int4Rtn
from engines.schemes.int8_sq import Int8SmoothQuant
from engines.schemes.int8_wo import Int8WeightOnly
from engines.schemes.nvfp4 import Nvfp4

__all__ = [
    "CALIBRATION_STATISTICS",
    "LayerResult",
    "QuantizeContext",
    "Scheme",
    "TrtllmMapping",
    "UnknownScheme",
    "get",
    "names",
    "register",
    "schemes",
    "torch_names",
    "trtllm_names",
    "unregister",
]

_REGISTRY: dict[str, Scheme] = {}


class UnknownScheme(ValueError):
    """A precision name no scheme is registered for."""


def register(scheme: Scheme) -> Scheme:
    """Add `scheme` under its name (listed after the ones registered before it), and the stored formats it
    brings to the runtime's format registry."""
    if scheme.name in _REGISTRY:
        raise ValueError(f"precision {scheme.name!r} is already registered")
    unknown = scheme.calibration - set(CALIBRATION_STATISTICS)
    if unknown:
        raise ValueError(f"precision {scheme.name!r} asks for unknown calibration statistics {sorted(unknown)}")
    if scheme.formats:
        from engines.torch.layers.formats import register_format

        for weight_format in scheme.formats:
            register_format(weight_format)
    _REGISTRY[scheme.name] = scheme
    return scheme


def unregister(name: str) -> None:
    """Remove a scheme (tests that register a toy one clean up with this)."""
    scheme = _REGISTRY.pop(name)
    if scheme.formats:
        from engines.torch.layers.formats import unregister_format

        for weight_format in scheme.formats:
            unregister_format(weight_format.name)


def get(name: str) -> Scheme:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownScheme(f"unknown precision {name!r}; kiln knows {', '.join(_REGISTRY)}") from None


def schemes() -> list[Scheme]:
    return list(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def torch_names() -> tuple[str, ...]:
    """The precisions kiln's torch engine builds, in registration order."""
    return tuple(s.name for s in _REGISTRY.values() if s.torch_build)


def trtllm_names() -> tuple[str, ...]:
    """The precisions TensorRT-LLM builds, in registration order."""
    return tuple(s.name for s in _REGISTRY.values() if s.trtllm is not None)


for _scheme in (Fp32(), Bf16(), Fp8(), Int8WeightOnly(), Int8SmoothQuant(), Int4Rtn(), Int4Awq(), Int4Gptq(), Nvfp4()):
    register(_scheme)
