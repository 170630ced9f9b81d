"""`python -m engines.torch.kernels`: compile (or load) every CPU kernel now and say which this machine uses.

The Docker image runs it at build time so that neither `kiln build` nor `kiln serve` pays the
one-time compilation (~3-4 min for all eight); on a laptop it answers "why is it slow here".
"""

from __future__ import annotations

import logging
import sys

from engines.torch.kernels import amx_linear, argmax, bf16_linear, int_linear, paged_attention, rms_norm, rope_kv, silu_mul

KERNELS = {
    "kiln_rms_norm": rms_norm,
    "kiln_bf16_gemv": bf16_linear,
    "kiln_amx_linear": amx_linear,  # Intel AMX CPUs only
    "kiln_int_gemv": int_linear,
    "kiln_paged_attention": paged_attention,
    "kiln_rope_kv": rope_kv,
    "kiln_silu_mul": silu_mul,
    "kiln_argmax": argmax,
}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, module in KERNELS.items():
        print(f"{name}: {'compiled' if module.available() else 'unavailable (torch fallback)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
