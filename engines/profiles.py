"""Build profiles: one TOML file per target in build/profiles, naming what to build for it.

A profile says which precision the weights get (bf16, fp8, int8 weight-only or SmoothQuant, int4),
which dtype the KV cache gets, which backends can build it, and what hardware it needs (device, SM
range, CPU flags). `kiln profiles` lists them; `kiln build --precision auto` asks `pick`.

How `pick(hardware, model_bytes_bf16, memory_bytes)` chooses (the rules, as data plus one loop):

1. Keep the profiles the hardware supports (`supported_on`): the device matches, the GPU's SM is
   within [min_sm, max_sm], the CPU has the required flags.
2. Try them from the highest `priority` down and take the first whose weights fit the memory
   budget: 90% of the memory of the GPUs the model runs on (one GPU for kiln's torch engine, tensor x
   pipeline parallel GPUs for a split TensorRT-LLM engine: never GPUs nothing splits the model
   across), 50% of RAM on CPU. The weight size of a profile is the bf16 size scaled to its precision
   (int4 counts its group scales and zeros).
3. When none fits, take the supported profile with the smallest weights: the best there is.

With the shipped priorities this gives:
- SM >= 89 (Ada, Hopper and later): FP8 W8A8 with an FP8 KV cache (ada-fp8, hopper-fp8); INT4 AWQ
  when the FP8 weights would not fit.
- SM 80-86 (Ampere): SmoothQuant INT8 W8A8 with an INT8 KV cache (ampere-int8-sq); INT4 AWQ
  (any-gpu-int4-awq) when the INT8 weights would not fit in 90% of GPU memory.
- Older GPUs: bf16 (gpu-bf16), since FP8 and INT8 tensor cores are missing.
- CPU: INT8 weights with an INT8 KV cache (cpu-int8); INT4 weights (cpu-int4) when the INT8 weights
  would take more than half the RAM, where decode is bound by memory bandwidth and size.
  cpu-bf16 and cpu-fp32 are never picked automatically; name them to get them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from engines import schemes
from engines.data_files import data_dir
from engines.hardware import CPU_FLAGS_OF_INTEREST, Hardware
from engines.trtllm import flows as trtllm_flows

PROFILES_DIR = data_dir("profiles")

BACKENDS = ("torch", "trtllm")
KV_CACHE_DTYPES = ("model", "int8", "fp8")
DEVICES = ("cpu", "cuda")
DEFAULT_GROUP_SIZE = 128

GPU_MEMORY_BUDGET = 0.90  # of the memory of the GPUs the model runs on that the weights may take
CPU_MEMORY_BUDGET = 0.50  # of RAM the weights may take before int4 wins on CPU


class ProfileError(ValueError):
    """A profile file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class Requirements:
    device: str
    min_sm: int | None = None
    max_sm: int | None = None
    cpu_flags: tuple[str, ...] = ()  # all of these
    cpu_flags_any: tuple[str, ...] = ()  # at least one of these


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: tuple[str, ...]  # backends that can build it, preferred first
    precision: str
    kv_cache_dtype: str
    requires: Requirements
    priority: int
    group_size: int | None = None  # int4 only
    path: Path | None = None

    def weight_bytes(self, model_bytes_bf16: float) -> float:
        return model_bytes_bf16 / 2 * bytes_per_param(self.precision, self.group_size or DEFAULT_GROUP_SIZE)

    def requires_text(self) -> str:
        req = self.requires
        parts = [req.device]
        if req.min_sm is not None and req.max_sm is not None:
            parts.append(f"SM {req.min_sm}" if req.min_sm == req.max_sm else f"SM {req.min_sm}-{req.max_sm}")
        elif req.min_sm is not None:
            parts.append(f"SM >= {req.min_sm}")
        elif req.max_sm is not None:
            parts.append(f"SM <= {req.max_sm}")
        if req.cpu_flags:
            parts.append("+".join(req.cpu_flags))
        if req.cpu_flags_any:
            parts.append(" or ".join(req.cpu_flags_any))
        return " ".join(parts)


def bytes_per_param(precision: str, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Stored bytes per weight of `precision` (its scheme's bytes_per_param)."""
    return schemes.get(precision).bytes_per_param(group_size)


_FIELDS = {"name", "description", "backend", "precision", "kv_cache_dtype", "requires", "priority", "group_size"}
_REQUIRED = ("name", "description", "backend", "precision", "kv_cache_dtype", "requires", "priority")
_REQUIRES_FIELDS = {"device", "min_sm", "max_sm", "cpu_flags", "cpu_flags_any"}


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file; any problem is one ProfileError sentence naming the file."""
    path = Path(path)

    def fail(problem: str) -> ProfileError:
        return ProfileError(f"Profile {path}: {problem}.")

    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"is not valid TOML ({exc})") from exc

    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise fail(f"missing field {', '.join(repr(key) for key in missing)}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise fail(f"unknown field {', '.join(repr(key) for key in unknown)}")
    for key in ("name", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise fail(f"{key!r} must be a non-empty string")
    if data["name"] != path.stem:
        raise fail(f"name {data['name']!r} must match the file name {path.stem!r}")

    backend = data["backend"]
    backend = [backend] if isinstance(backend, str) else backend
    if not isinstance(backend, list) or not backend or any(b not in BACKENDS for b in backend):
        raise fail(f"'backend' must be one or a list of {', '.join(BACKENDS)}, got {data['backend']!r}")
    precisions = schemes.torch_names()
    if data["precision"] not in precisions:
        raise fail(f"'precision' must be one of {', '.join(precisions)}, got {data['precision']!r}")
    if data["kv_cache_dtype"] not in KV_CACHE_DTYPES:
        raise fail(f"'kv_cache_dtype' must be one of {', '.join(KV_CACHE_DTYPES)}, got {data['kv_cache_dtype']!r}")
    if "trtllm" in backend:
        try:
            refusal = trtllm_flows.refusal(data["precision"], data["kv_cache_dtype"])
        except ValueError as exc:  # TrtllmUnsupported: not a TensorRT-LLM precision
            refusal = str(exc)
        if refusal:
            raise fail(f"backend 'trtllm' cannot build it: {refusal.rstrip('.')}")
    if not isinstance(data["priority"], int) or isinstance(data["priority"], bool):
        raise fail(f"'priority' must be an integer, got {data['priority']!r}")
    group_size = data.get("group_size")
    if group_size is not None:
        if not schemes.get(data["precision"]).grouped:
            raise fail("'group_size' applies to int4 precisions only")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise fail(f"'group_size' must be a positive integer, got {group_size!r}")

    return Profile(
        name=data["name"],
        description=data["description"],
        backend=tuple(backend),
        precision=data["precision"],
        kv_cache_dtype=data["kv_cache_dtype"],
        requires=_requirements(data["requires"], fail),
        priority=data["priority"],
        group_size=group_size,
        path=path,
    )


def _requirements(req, fail) -> Requirements:
    if not isinstance(req, dict):
        raise fail("'requires' must be a table")
    unknown = sorted(set(req) - _REQUIRES_FIELDS)
    if unknown:
        raise fail(f"unknown field {', '.join(repr('requires.' + key) for key in unknown)}")
    if req.get("device") not in DEVICES:
        raise fail(f"'requires.device' must be one of {', '.join(DEVICES)}, got {req.get('device')!r}")
    for key in ("min_sm", "max_sm"):
        value = req.get(key)
        if value is not None:
            if req["device"] != "cuda":
                raise fail(f"'requires.{key}' applies to cuda profiles only")
            if not isinstance(value, int) or isinstance(value, bool) or value < 10:
                raise fail(f"'requires.{key}' must be an SM version such as 80 or 90, got {value!r}")
    if req.get("min_sm") is not None and req.get("max_sm") is not None and req["min_sm"] > req["max_sm"]:
        raise fail(f"'requires.min_sm' {req['min_sm']} is above 'requires.max_sm' {req['max_sm']}")
    for key in ("cpu_flags", "cpu_flags_any"):
        flags = req.get(key, [])
        if not isinstance(flags, list) or any(flag not in CPU_FLAGS_OF_INTEREST for flag in flags):
            raise fail(f"'requires.{key}' must be a list drawn from {', '.join(CPU_FLAGS_OF_INTEREST)}, got {flags!r}")
    return Requirements(
        device=req["device"],
        min_sm=req.get("min_sm"),
        max_sm=req.get("max_sm"),
        cpu_flags=tuple(req.get("cpu_flags", [])),
        cpu_flags_any=tuple(req.get("cpu_flags_any", [])),
    )


def profiles_dir() -> Path:
    return Path(os.environ.get("KILN_PROFILES_DIR", PROFILES_DIR))


def load_profiles(folder: Path | None = None) -> list[Profile]:
    """All profiles in `folder` (default: build/profiles), highest priority first."""
    folder = profiles_dir() if folder is None else Path(folder)
    paths = sorted(folder.glob("*.toml"))
    if not paths:
        raise ProfileError(f"No profiles found: {folder} has no *.toml files.")
    profiles = [load_profile(path) for path in paths]
    return sorted(profiles, key=lambda p: (-p.priority, p.name))


def supported_on(profile: Profile, hardware: Hardware) -> tuple[bool, str]:
    """Whether `hardware` can run `profile`, and if not, why (one phrase, for tables and errors)."""
    req = profile.requires
    if req.device != hardware.device:
        return False, "needs a CUDA GPU" if req.device == "cuda" else "CPU-only profile"
    if req.device == "cuda":
        sm = hardware.sm or 0
        if req.min_sm is not None and sm < req.min_sm:
            return False, f"needs SM >= {req.min_sm}{_why_sm(profile)}, this GPU is SM {sm}"
        if req.max_sm is not None and sm > req.max_sm:
            return False, f"for SM <= {req.max_sm}, this GPU is SM {sm} (a newer profile applies)"
    missing = [flag for flag in req.cpu_flags if flag not in hardware.cpu_flags]
    if missing:
        return False, f"needs CPU flag {' and '.join(missing)}"
    if req.cpu_flags_any and not set(req.cpu_flags_any) & hardware.cpu_flags:
        return False, f"needs CPU flag {' or '.join(req.cpu_flags_any)}"
    return True, "supported"


def _why_sm(profile: Profile) -> str:
    reason = schemes.get(profile.precision).sm_reason
    return f" ({reason})" if reason else ""


def memory_budget(hardware: Hardware, memory_bytes: float) -> float:
    return memory_bytes * (GPU_MEMORY_BUDGET if hardware.device == "cuda" else CPU_MEMORY_BUDGET)


def pick(
    hardware: Hardware, model_bytes_bf16: float, memory_bytes: float, profiles: list[Profile] | None = None
) -> Profile:
    """The profile `--precision auto` builds (rules in the module docstring)."""
    profiles = load_profiles() if profiles is None else profiles
    candidates = sorted((p for p in profiles if supported_on(p, hardware)[0]), key=lambda p: (-p.priority, p.name))
    if not candidates:
        raise ProfileError(f"No profile supports this machine ({hardware.describe()}).")
    budget = memory_budget(hardware, memory_bytes)
    for profile in candidates:
        if profile.weight_bytes(model_bytes_bf16) <= budget:
            return profile
    return min(candidates, key=lambda p: (p.weight_bytes(model_bytes_bf16), -p.priority))
