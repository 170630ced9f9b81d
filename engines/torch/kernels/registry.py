"""Every CPU kernel module, by extension name: what `python -m engines.torch.kernels` compiles and what
the engine's warm-up loads before the server says it is ready."""

from __future__ import annotations

from engines.torch.kernels import (
    amx_linear,
    argmax,
    bf16_linear,
    int_linear,
    paged_attention,
    panel_linear,
    rms_norm,
    rope_kv,
    silu_mul,
    token_mask,
)

KERNELS = {
    "kiln_rms_norm": rms_norm,
    "kiln_bf16_gemv": bf16_linear,
    "kiln_amx_linear": amx_linear,  # Intel AMX CPUs only
    "kiln_int_gemv": int_linear,
    "kiln_panel_linear": panel_linear,  # AVX512-BF16 CPUs only
    "kiln_paged_attention": paged_attention,
    "kiln_rope_kv": rope_kv,
    "kiln_silu_mul": silu_mul,
    "kiln_argmax": argmax,
    "kiln_token_mask": token_mask,
}
